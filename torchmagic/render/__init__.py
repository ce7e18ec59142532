"""Views of a trace (DOT, SVG, text, HTML); they know nothing of IPython."""
