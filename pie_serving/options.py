"""What the command lines (`pie-sim`, `pie-exec`, `pie-validate`) share: the parser (defaults in `--help`,
one-line errors), the types their values must have, the engine options and the settings they make for
`pie_policy.sizing` (the policy package itself parses no command line), and how a command runs and reports
a user's error; what benchmark.json reports.

A rule that belongs to one option (a positive count, a finite size, a fraction) is that option's argparse
`type=`, so the refusal names the option and exits 2 before anything runs; a rule that spans options or
needs a file's contents is the command's."""
from __future__ import annotations

import argparse
import math
import re
import signal
import sys
import warnings
from typing import Callable, NoReturn

from rich.console import Console
from rich.markup import escape

from pie_policy import ConfigError

from .benchmark import DEFAULT_PERCENTILES
from .slo import Slo, parse_percentiles, parse_slos

SEED_LIMIT = 2**32  # numpy's and torch's seeds alike
LOG_WIDTH = 1000    # a console that is not a terminal (a log, a pipe): tables at their natural width, whole


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in `--help`, unless it has none or its help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the option (`--block-size must be a positive
    integer, got 0`), exit status 2, and whose sub-commands are Parsers too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ([^:]+): (must|is) ", r"\1 \2 ", message)
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Rule:
    """What one option's value must be: an argparse `type=` (`rule(text)`), and a check of a value given
    another way (`rule.check(value)`, a grid's), with one message for both."""

    def __init__(self, kind: Callable[[str], float], what: str, accept: Callable[[float], bool]):
        self.kind, self.what, self.accept = kind, what, accept
        self.__name__ = what  # argparse names a type by it

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.what}, got {text!r}") from None
        return self.check(value, argparse.ArgumentTypeError)

    def check(self, value, error: type[Exception] = ValueError):
        """`value` if it is acceptable, else `error` saying what it must be."""
        if not self.accept(value):
            raise error(f"must be {self.what}, got {value}")
        return value


def _integer(text: str) -> int:
    return int(text.strip())


positive_int = Rule(_integer, "a positive integer", lambda v: v >= 1)
non_negative_int = Rule(_integer, "a non-negative integer", lambda v: v >= 0)
seed = Rule(_integer, f"an integer in [0, {SEED_LIMIT})", lambda v: 0 <= v < SEED_LIMIT)
positive_float = Rule(float, "a positive finite number", lambda v: 0 < v < math.inf)
non_negative_float = Rule(float, "a non-negative finite number", lambda v: 0 <= v < math.inf)
fraction = Rule(float, "a fraction in (0, 1]", lambda v: 0 < v <= 1)
open_fraction = Rule(float, "a fraction in (0, 1)", lambda v: 0 < v < 1)
share = Rule(float, "a share in [0, 1)", lambda v: 0 <= v < 1)
rate = Rule(float, "a positive number of requests a second (inf: all at once)", lambda v: v > 0)


def names(text: str) -> list[str]:
    """A comma-separated list's names, blanks dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def name_list(text: str) -> list[str]:
    """An argparse `type=`: a comma-separated list of at least one name, none repeated."""
    found = names(text)
    if not found:
        raise argparse.ArgumentTypeError(f"must name at least one, got {text!r}")
    repeated = [n for i, n in enumerate(found) if n in found[:i]]
    if repeated:
        raise argparse.ArgumentTypeError(f"must not name {repeated[0]!r} twice")
    return found


class Interrupted(Exception):
    """SIGTERM, turned into an exception so that the command's cleanup runs (temporary outputs, children)."""


def _terminated(signum, frame) -> NoReturn:
    raise Interrupted(signal.Signals(signum).name)


def run_command(prog: str, command: Callable[[Console], int | None], user_errors: tuple[type[Exception], ...]) -> int:
    """Run `command` with a console at least 120 columns wide (in a log or a pipe: as wide as tables need); a
    user's error is one line naming it, exit status 2 (its text printed as it is, brackets included), and so
    is a file that cannot be read or written (a read-only folder, a full disk: the path and why). Ctrl-C or
    SIGTERM is one line, status 130 or 143, after the command's cleanup has run."""
    terminal = Console()
    console = Console(width=max(terminal.width, 120) if terminal.is_terminal else LOG_WIDTH)
    warnings.formatwarning = lambda message, *_: f"{prog}: warning: {message}\n"

    def say(text: str) -> None:
        console.print(f"[red]{prog}:[/] {escape(text)}", highlight=False, soft_wrap=True)

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return command(console) or 0
    except user_errors as e:
        say(f"error: {e}")
        return 2
    except OSError as e:  # an unwritable --out, a full disk: the outputs are written whole or not at all
        say(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Interrupted:
        say("terminated")
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.stdout.flush()


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None, user_errors: tuple[type[Exception], ...],
            command: Callable[[argparse.Namespace, Console], int | None] = lambda args, console: args.run(args, console)
            ) -> int:
    """A command line's `main`: parse `argv` (a bad option is one line on stderr, status 2; --help, 0), then
    `run_command`. Returns the exit status rather than raising SystemExit, for callers and tests alike."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return run_command(parser.prog, lambda console: command(args, console), user_errors)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine options both command lines take (see `engine_settings`)."""
    parser.add_argument("--share", type=share, help="static: its CPU share of the live KV (default 0.2); pie: the "
                        "largest share it may reach (default: the link's bound on the hardware the run is priced on); pie-fixed: "
                        "its share (default 0.1); "
                        "prompt-offload: the most its staging area is sized for (default 0.5)")
    parser.add_argument("--block-size", type=positive_int, default=16, help="tokens a KV block holds")
    parser.add_argument("--max-num-seqs", type=positive_int, default=256, help="most sequences in one batch "
                        "(vLLM's --max-num-seqs)")
    parser.add_argument("--chunked-prefill", action="store_true",
                        help="split long prompts over iterations (vLLM's --enable-chunked-prefill)")
    parser.add_argument("--prefetch-depth", type=positive_int, default=1,
                        help="layers prefetched ahead (pie, static, prompt-offload); below the model's layers")
    parser.add_argument("--seed", type=seed, default=0, help="seeds the workload's sampling and arrivals "
                        "(and pie-exec's random weights and prompts)")


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="write into an --out that is not empty, replacing "
                                                             "the files this command writes (others are kept)")


def engine_settings(args: argparse.Namespace) -> dict:
    """Keyword arguments for engine_config / build_policy from `add_engine_arguments`' options."""
    return dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs, chunked_prefill=args.chunked_prefill,
                prefetch_depth=args.prefetch_depth)


def add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    """What a run's benchmark.json reports beyond the fixed keys (see `metric_settings`)."""
    default = ",".join(f"{p:g}" for p in DEFAULT_PERCENTILES)
    parser.add_argument("--percentiles", default=default, help="percentiles of TTFT, TPOT, ITL and e2e latency "
                        f"in benchmark.json, comma-separated, each in (0, 100] (vLLM's --metric-percentiles; "
                        f"default {default})")
    parser.add_argument("--slo", action="append", metavar="METRIC_STAT=SECONDS",
                        help="an SLO whose per-request targets set benchmark.json's request_goodput, e.g. "
                             "ttft_p99=2 (metrics ttft, tpot, e2e, normalized, itl; STAT pNN or mean); repeat "
                             "for several (default: none, request_goodput null)")


def metric_settings(args: argparse.Namespace) -> tuple[tuple[float, ...], tuple[Slo, ...]]:
    """(percentiles, SLOs) from `add_metric_arguments`' options; a bad one raises SloError naming it."""
    return parse_percentiles(args.percentiles), parse_slos(args.slo)


CV_HELP = ("coefficient of variation of the re-timed gaps: Gamma-distributed, Poisson at 1 (vLLM's "
           "benchmark_serving --burstiness B is cv = 1/sqrt(B))")


def check_cv(args: argparse.Namespace, retimed: bool | None = None) -> float:
    """The gaps' cv (1 when not given); refused where the arrivals keep their own times, which it would not
    change. `retimed`: whether the command re-times them (default: whether --rate is given)."""
    if args.cv is not None and not (args.rate is not None if retimed is None else retimed):
        raise ConfigError("--cv shapes the gaps of re-timed arrivals: it needs --rate")
    return 1.0 if args.cv is None else args.cv
