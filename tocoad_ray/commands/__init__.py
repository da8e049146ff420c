"""The library's own ``tocoad`` subcommands (no cluster needed), one module each with
``add_parser(sub)``. Layers above the library (``jobs``, ``serve``) add theirs through the
``tocoad.commands`` entry-point group, so the library never imports them."""

BUILTIN = ("fit", "evaluate", "predict", "export", "synth", "bank")
ENTRY_POINT_GROUP = "tocoad.commands"
