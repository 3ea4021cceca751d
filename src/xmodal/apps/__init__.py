"""Applications built on the library: the quickstart, the demo and the builders of real data
sets from packages (npm, Debian). Nothing in the library imports them; ``xmodal.commands`` runs
them."""
