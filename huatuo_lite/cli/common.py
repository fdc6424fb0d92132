"""Helpers every command shares: the research notice and the model argument's default."""
from __future__ import annotations

import os
import click

from ..errors import HuatuoError
from ..families.common import DEMO_NOTICE, RESEARCH_NOTICE


def show_notice(quiet: bool) -> None:
    """The research-use notice, once per run, on stderr (upstream shows it too)."""
    if not quiet and not os.environ.get("HUATUO_LITE_NO_NOTICE"):
        click.echo(RESEARCH_NOTICE, err=True)


def model_or_default(model):
    """The given model; else $HUATUO_LITE_MODEL, the one installed model, or the
    bundled demo model (said in one line); else a sentence on how to choose one."""
    from .. import store

    choice = model or store.default_model()
    if choice is None:
        raise HuatuoError("No model given: pass --model with a model folder (see `huatuo-lite convert --help`).")
    if model is None and store.is_demo(choice):
        click.echo(DEMO_NOTICE, err=True)
    return choice
