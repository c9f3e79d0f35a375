"""Every command's --help renders (argparse %-formats help texts; a stray % once broke one)."""

from __future__ import annotations

import argparse

import pytest

from ilora.cli.main import build_parser, main


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) for every command and sub-command."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def test_every_command_formats_its_help():
    found = list(commands(build_parser()))
    assert ("teacher", "train") in [path for path, _ in found]
    for path, parser in found:
        assert parser.format_help(), path


def test_teacher_train_help_shows_percent_signs_and_the_shared_inputs_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["teacher", "train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--share-adapter-inputs" in out
    assert "5.8 % of a compiled 7B step" in " ".join(out.split())


def test_an_unknown_flag_shows_the_usage_of_the_command_given(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["rec", "train", "DATA", "--out", "OUT", "--bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ilora rec train ") and "unrecognized arguments: --bogus" in err


@pytest.mark.parametrize("command", [["rec", "eval", "DATA", "--model", "M"], ["teacher", "eval", "DATA", "--teacher", "T"]])
def test_the_eval_commands_take_the_candidate_seed_by_the_trainers_name_too(command):
    """rec train and distill call the candidate seed --cand-seed (beside their own --seed); the eval
    commands, which have no other seed, take that name as well as --seed."""
    parser = build_parser()
    assert parser.parse_args([*command, "--cand-seed", "3"]).seed == 3
    assert parser.parse_args([*command, "--seed", "4"]).seed == 4
    assert parser.parse_args(command).seed == 0


def test_run_help_lists_every_key_a_run_config_takes_with_its_default(capsys):
    """`ilora run --help` lists the YAML keys (nested ones dotted) with a help text each, and no
    key that the config would refuse (a few are set as overrides below)."""
    import dataclasses

    from ilora.config import from_dict, parse_overrides
    from ilora.pipeline.config import RunConfig

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("keys (YAML, or key=value overrides):\n", 1)[1].splitlines() if line.startswith("  ") and not line.startswith("   ")]

    def keys(cls, prefix=""):  # the reference: every leaf field, walked here independently of the help code
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from keys(type(default), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    assert listed == list(keys(RunConfig))
    from ilora.config import option_lines

    assert [key for key, text in option_lines(RunConfig) if text.startswith("[")] == []  # every key explained, not just its default
    assert {"eval.gates", "data.synth.users", "teacher.share_adapter_inputs", "distill.control_seed", "export.device"} <= set(listed)
    assert "default: ['learned', 'uniform', 'experts']" in " ".join(out.split())
    cfg = from_dict(RunConfig, parse_overrides(["data.synth.users=7", "eval.gates=learned,experts", "export.device=cpu"]))
    assert cfg.data.synth.users == 7 and cfg.eval.gates == ["learned", "experts"]
