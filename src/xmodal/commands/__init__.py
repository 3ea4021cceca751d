"""One module per ``xmodal`` subcommand: ``add(subparsers)`` declares it, ``run(args)`` runs it."""
