"""One module per ``xmodal`` subcommand: ``add(subparsers)`` declares it, ``run(args)`` runs it."""

MODEL_HELP = (
    "a preset, a model directory, a transformers CLIP/SigLIP/ChineseCLIP/VisionTextDualEncoder "
    "folder or hf:<hub id>, or open_clip:<arch>/<tag>"
)
