"""The errors a user can act on. The CLI prints their one-line message (exit 1); any other exception is a bug and
keeps its traceback. (Recipe mistakes are ftlib.recipe.RecipeError, exit 2.)"""


class UserError(Exception):
    """Bad input, a missing or inconsistent file, a failed job: the message names what is wrong and where."""
