"""``m2cache bench`` (its switches are ``m2cache.bench.args``', its harness ``m2cache.bench.harness``), and
``synth`` / ``export-gguf`` / ``grow`` / ``locality`` / ``place``."""
from __future__ import annotations

from m2cache.bench.args import HELP, add_arguments
from m2cache.bench.harness import cmd_bench

# imports inside functions: the offline commands' modules load torch: imported when the parser is built,
# not with this module


def add_commands(sub) -> None:
    from m2cache.offline.export_gguf import add_export_command
    from m2cache.offline.grow import add_grow_command
    from m2cache.offline.locality import add_locality_command
    from m2cache.offline.place import add_place_command
    from m2cache.offline.synth import add_synth_command

    p = sub.add_parser("bench", help=HELP)
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    add_synth_command(sub)
    add_export_command(sub)
    add_grow_command(sub)
    add_locality_command(sub)
    add_place_command(sub)
