"""A griffe extension for the API pages.

An `equinox.Module` gets its `__init__` from `dataclasses`, without a docstring, and
inspection then finds the one Python gives `object.__init__` ("Initialize self. See
help(type(self))..."). With `merge_init_into_class`, mkdocstrings would append it to
every class; this drops it.
"""

import inspect

import griffe


_PYTHON_INIT_DOC = inspect.cleandoc(object.__init__.__doc__ or "")


class DropObjectInitDocstring(griffe.Extension):
    def on_function_instance(self, *, node, func, agent, **kwargs):
        del node, agent, kwargs
        docstring = func.docstring
        if func.name == "__init__" and docstring is not None:
            if inspect.cleandoc(docstring.value) == _PYTHON_INIT_DOC:
                func.docstring = None
