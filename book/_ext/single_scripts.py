"""Each inline script once per page: Sphinx 7.4 lists one added after the builder started twice (sphinx-doc/sphinx#13402)."""


def _key(script):
    return (script.filename or "", script.priority, tuple(sorted(script.attributes.items())))


def drop_repeated_scripts(app, pagename, templatename, context, doctree):
    unique = {}
    for script in context.get("script_files", []):
        unique.setdefault(_key(script), script)
    context["script_files"] = list(unique.values())


def setup(app):
    app.connect("html-page-context", drop_repeated_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
