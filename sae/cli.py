"""The command line of ``train.py`` and ``evaluate.py``: overrides checked before Hydra runs, one line per problem.

Hydra reports a bad override (a value of the wrong type, a key that does not exist) with several lines of its own
and, for some errors, a traceback. Before the application starts, each override of the command line is composed
against the config (every value of a sweep in turn), and whatever cannot be composed is reported in one line,
with the new name of a key that moved, and exit status 2.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

MAX_ROUNDS = 20  # problems reported at most (each round finds one)


def _concrete(overrides: list[str]) -> list[list[str]]:
    """Lists of plain overrides that together cover every value of every sweep (one sweep varied at a time)."""
    parsed = [o for o in OverridesParser.create().parse_overrides(overrides) if not o.is_hydra_override()]
    first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
             for o in parsed]
    variants = [first]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            for value in list(o.sweep_string_iterator())[1:]:
                variants.append([*first[:i], f"{o.get_key_element()}={value}", *first[i + 1:]])
    return variants


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def describe(err: Exception, moved: dict[str, str], overrides: list[str]) -> tuple[str | None, str]:
    """The override among ``overrides`` that an error of composition is about (when it names one) and one line
    saying what is wrong."""
    text = str(err)
    cause = err.__cause__ or err
    cause_line = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    named = re.search(r"(?:Error merging override|Could not override) '?([^'\s]+)'?", text)
    key = _key_of(named.group(1)) if named else None
    override = next((o for o in overrides if _key_of(o) == key), None)
    if override is None:
        return None, " ".join(text.split())
    value = override.split("=", 1)[1] if "=" in override else "..."
    if key in moved:
        return override, f"{key} moved to {moved[key]}: write {moved[key]}={value}"
    if "not in" in cause_line or "is not in struct" in cause_line:
        return (
            override,
            f"'{key}' is not a setting here (see the configuration reference, docs/configuration.md; prefix it "
            "with + to add a new key)",
        )
    return override, f"{override}: {cause_line}"


def command_line_problems(conf_dir: Path, config_name: str, overrides: list[str], moved: dict[str, str]) -> list[str]:
    """Every problem of ``overrides`` against ``config_name`` in ``conf_dir``; empty when they all compose."""
    try:
        variants = _concrete(overrides)
    except HydraException as err:
        return [" ".join(str(err).split())]
    problems: list[str] = []
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        for variant in variants:
            remaining = list(variant)
            for _ in range(MAX_ROUNDS):
                try:
                    compose(config_name, overrides=remaining)
                    break
                except (HydraException, OmegaConfBaseException) as err:
                    override, problem = describe(err, moved, remaining)
                    if problem not in problems:
                        problems.append(problem)
                    if override not in remaining:
                        break
                    remaining.remove(override)
    return problems


def check_command_line(conf_dir: Path, config_name: str, moved: dict[str, str], argv: list[str] | None = None) -> None:
    """Exit with one line (status 2) when the command line's overrides do not compose; return otherwise."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.help or args.hydra_help or args.shell_completion or not args.overrides:
        return
    problems = command_line_problems(conf_dir, config_name, args.overrides, moved)
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr, flush=True)
        sys.exit(2)
