"""Rendering of the workflows' results: table, JSON, Markdown, HTML. Nothing below imports it."""
