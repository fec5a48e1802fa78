"""One module per command: a guarded function that parses options, makes one library call and renders.

``cli.main`` registers them on the app."""
