"""Standard CLI manners, shared by `vmsup` and `vmtrace` so the two behave alike.

`-h`/`--help` and `--version` everywhere; shell completion (`--install-completion`,
`--show-completion`); no arguments prints the help and exits 0; every command's help ends with
examples; help wraps at words, never inside a value (`[default: 1.0]`, `tcp://HOST:PORT`,
`CURVE-encrypted`); a bad value is said in the tool's own words (`--vm must be a whole number,
not 'x'`), not the parsing library's.

A CLI makes its Typer app with `new_app`, gives its root callback `version_option(PROG)`, keeps a
table of examples per command, and runs with `run(app, PROG, EXAMPLES, err)`.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version as dist_version
from typing import Callable

import typer
import typer.main
from typer.exceptions import TyperException

HELP_NAMES = ["-h", "--help"]
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# Characters that hold a help text's values together while click wraps it: a no-break space
# inside [...] and a non-breaking hyphen (U+2011); both are turned back before printing.
_NBSP, _NBHY = "\u00a0", "\u2011"


def new_app(help: str) -> typer.Typer:
    """A Typer app with the shared manners (completion on, plain help that `-h` shows too)."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                       context_settings={"help_option_names": HELP_NAMES})


def package_version() -> str:
    try:
        return dist_version("vmsup")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


def version_option(prog: str):
    """The root callback's `--version` parameter: print `PROG VERSION` and exit 0."""
    def show(value: bool) -> None:
        if value:
            typer.echo(f"{prog} {package_version()}")
            raise typer.Exit(0)
    return typer.Option(False, "--version", "-V", is_eager=True, callback=show, help="Print the version and exit.")


def examples_epilog(lines: list[str]) -> str:
    # "\b" keeps click from re-flowing the paragraph: one example a line, as typed.
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def _keep_values_whole(text: str) -> str:
    out, depth = [], 0
    for ch in text:
        depth += ch == "["
        depth -= ch == "]" and depth > 0
        out.append(_NBSP if ch == " " and depth else _NBHY if ch == "-" else ch)
    return "".join(out)


def _restore(text: str) -> str:
    return text.replace(_NBSP, " ").replace(_NBHY, "-")


def _tidy_formatter(base):
    class TidyFormatter(base):
        def write_dl(self, rows, *args, **kwargs):
            super().write_dl([(term, _keep_values_whole(text)) for term, text in rows], *args, **kwargs)

        def getvalue(self) -> str:
            return _restore(super().getvalue())
    return TidyFormatter


def _metavar(param) -> str | None:
    """The metavar typer would spell as `<str>` or `<int range>`: the option's name instead."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    if param.param_type_name == "argument":
        return (param.name or "value").upper()
    longest = max(param.opts, key=len).lstrip("-")
    return longest.upper().replace("-", "_")


def _argument_usage(param) -> str:
    """`TRACE`, `[VM]`, `TRACE...`, `[GUESTS]...` as usage lines spell them (typer writes `{TRACE}`)."""
    name = (param.metavar or (param.name or "value").upper()).removesuffix("...")
    name = name if param.required else f"[{name}]"
    return name + ("..." if param.nargs != 1 else "")


def commands_of(command) -> dict[str, object]:
    """Every command under a click group, by its name path ("launch", "keys", …)."""
    return dict(getattr(command, "commands", {}))


def click_command(app: typer.Typer, examples: dict[str, list[str]]):
    """The app's click command tree with the shared manners applied. Every command must have
    1–3 examples in `examples` (a missing one is a bug: the test walks every command)."""
    root = typer.main.get_command(app)
    for cmd in [root, *commands_of(root).values()]:
        base_context = cmd.context_class

        class Context(base_context):
            formatter_class = _tidy_formatter(base_context.formatter_class)

        cmd.context_class = Context
        for param in cmd.params:
            if param.metavar is None and param.name not in ("install_completion", "show_completion"):
                param.metavar = _metavar(param)
            if param.param_type_name == "argument":
                param.display_type_rich = lambda ctx: None  # "GUESTS", not "GUESTS <list[str]>"
                param.get_usage_pieces = lambda ctx, p=param: [_argument_usage(p)]
    for name, cmd in commands_of(root).items():
        if cmd.short_help is None and cmd.help:
            # The command list shows the first sentence whole (click would cut it at ~45 columns).
            first = " ".join(cmd.help.strip().split("\n\n")[0].split())
            cmd.short_help = first.split(". ")[0].rstrip(".") if ". " in first else first.rstrip(".")
        if name in examples:
            cmd.epilog = examples_epilog(examples[name])
    if "" in examples:
        root.epilog = examples_epilog(examples[""])
    return root


def _option_label(param) -> str:
    if param is None:
        return "a value"
    if param.param_type_name == "argument":
        return (param.name or "value").upper()
    longest = max(param.opts, key=len)
    short = [o for o in param.opts if not o.startswith("--")]
    return f"{longest} ({short[0]})" if short else longest  # the user may have typed either


def own_words(error: Exception) -> str:
    """A usage error in the tool's words. Typer checks values with pydantic, whose messages
    ("Input should be a valid number, unable to parse string as a number") name no option and
    speak of "Input"; the error it raises carries pydantic's structured errors as its cause."""
    cause = error.__cause__
    param = getattr(error, "param", None)
    errors = getattr(cause, "errors", None)
    if param is not None and callable(errors):
        first = (errors() or [{}])[0]
        kind, given, ctx = first.get("type", ""), first.get("input"), first.get("ctx") or {}
        label = _option_label(param)
        shown = repr(given) if isinstance(given, str) else str(given)
        number = str(given)  # a bound is broken by a number: shown as typed, without quotes
        if kind.startswith("int_"):
            return f"{label} must be a whole number, not {shown}"
        if kind.startswith("float_") or kind.startswith("decimal_"):
            return f"{label} must be a number, not {shown}"
        if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            word = {"greater_than_equal": "at least", "greater_than": "more than",
                    "less_than_equal": "at most", "less_than": "less than"}[kind]
            bound = next(iter(ctx.values()), "?")
            return f"{label} must be {word} {bound}, not {number}"
        if kind in ("enum", "literal_error"):
            return f"{label} must be one of {ctx.get('expected', '?')}, not {shown}"
        if kind == "value_error" and "error" in ctx:
            return f"{label}: {ctx['error']}"
        if kind.startswith("bool_"):
            return f"{label} must be true or false, not {shown}"
        return f"{label}: bad value {shown}"
    return (error.format_message() if hasattr(error, "format_message") else str(error)).rstrip(".")


def run(app: typer.Typer, prog: str, examples: dict[str, list[str]], err: Callable[[str], None]) -> None:
    """Console-script body: expected failures become one line and an exit code, never a traceback."""
    command = click_command(app, examples)
    args = sys.argv[1:]
    if not args:  # no arguments: the help, as a request, not an error
        with command.make_context(prog, ["--help"], resilient_parsing=True) as ctx:
            typer.echo(command.get_help(ctx))
        sys.exit(0)
    try:
        # standalone_mode=False: click returns a command's exit code instead of exiting itself.
        code = command.main(args=args, prog_name=prog, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except TyperException as e:  # usage errors: bad flag values, missing arguments
        err(own_words(e))
        sys.exit(getattr(e, "exit_code", EXIT_BAD_INPUT))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err("aborted")
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(EXIT_INTERRUPTED)
