"""User-facing errors: each carries one sentence that says what is wrong and what
to do. The CLI turns them into a ClickException (exit 1); nothing else should
reach the user as a traceback."""


class HuatuoError(Exception):
    """Bad input or environment, explained in one sentence."""


class ModelFormatError(HuatuoError):
    """A model folder or file that is not what it should be."""


class ImageError(HuatuoError):
    """An image that cannot be read or is refused."""


class PromptError(HuatuoError):
    """A question or conversation that cannot be run (empty, too many images, too long)."""
