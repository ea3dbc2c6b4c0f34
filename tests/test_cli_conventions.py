"""Unix conventions of the command line (issue 14): primary output on stdout,
usage errors, readable help, dtype aliases, ~/$VAR, JSON on error, completion."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

from conftest import assert_clean_error, load_st, run_cli, save_st


@pytest.fixture
def run(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    rng = np.random.default_rng(0)
    files = []
    for k in (1, 2, 3):
        files.append(save_st(d / f"ckpt-{k}.safetensors", {
            "vars/10": rng.standard_normal(4).astype(np.float32),
            "vars/2": rng.standard_normal(4).astype(np.float32),
            "dense/kernel": rng.standard_normal((25, 20)).astype(np.float32),  # 2000 bytes
            "global_step": np.array(100 * k, np.int64),
        }))
    return d, files


def test_bare_command_prints_usage_and_exits_2():
    res = run_cli()
    assert res.code == 2 and res.out == "", res
    assert res.err.startswith("Usage: ema-avg") and "inspect" in res.err and "error:" not in res.err, res
    assert len(res.err.splitlines()) < 10  # the usage, not the whole help


def test_misspelled_command_names_the_right_one(run):
    res = run_cli("inpsect", "x")
    assert_clean_error(res, code=2)
    assert res.err.strip() == "error: unknown command 'inpsect' (did you mean 'inspect'?)"
    res = run_cli("restore-mpa", "x", "--json")
    assert res.code == 2 and "did you mean 'restore-map'" in res.err
    assert res.json() == {"error": {"message": "unknown command 'restore-mpa' (did you mean 'restore-map'?)",
                                    "path": None, "tensor": None, "exit_code": 2}}
    # a first argument that is a path stays an input of `average` (here: -o is missing)
    d, files = run
    assert_clean_error(run_cli(d), "--output", code=2)


def test_help_lists_version_and_completion_with_readable_placeholders():
    res = run_cli("--help")
    assert res.code == 0 and "--version" in res.out and "--install-completion" in res.out, res
    res = run_cli("average", "--help")
    assert res.code == 0, res
    assert "Usage: ema-avg average [OPTIONS] INPUT..." in res.out
    assert "--weights W1,W2,..." in res.out and "-o, --output OUT" in res.out
    assert "<list[str]>" not in res.out and "{inputs}" not in res.out and "<str>" not in res.out
    for cmd in ("posthoc", "plan", "inspect", "restore-map", "rename"):
        out = run_cli(cmd, "--help").out
        assert "<str>" not in out and "<list[str]>" not in out and "<float>" not in out, (cmd, out)


def test_inspect_table_goes_to_stdout_in_natural_order(run):
    d, files = run
    res = run_cli("inspect", files[0])
    assert res.code == 0 and res.err == "", res
    kernel = [ln for ln in res.out.splitlines() if "kernel" in ln]  # `ema-avg inspect X | grep kernel`
    assert len(kernel) == 1 and "float32" in kernel[0] and "[25, 20]" in kernel[0] and "2.0 kB" in kernel[0]
    assert "┃" not in res.out  # plain text off a terminal
    names = [ln.split()[0] for ln in res.out.splitlines()[2:-1]]
    assert names == ["dense/kernel", "global_step", "vars/2", "vars/10"]
    doc = run_cli("inspect", files[0], "--json").json()
    assert [t["name"] for t in doc["tensors"]] == names and doc["path"] == str(files[0])


def test_plan_table_on_stdout_plain_or_rich(run):
    d, files = run
    res = run_cli("plan", d, "--decay", "0.5")
    assert res.code == 0 and res.err == "", res
    rows = [ln.split() for ln in res.out.splitlines() if "ckpt-" in ln]
    assert [r[1] for r in rows] == [str(f) for f in files] and [r[2] for r in rows] == ["100", "200", "300"]
    assert [float(r[3]) for r in rows] == [0.25, 0.25, 0.5] and "sum |w| = 1.000000" in res.out
    rich = run_cli("plan", d, "--decay", "0.5", env={"FORCE_COLOR": "1", "COLUMNS": "200"})
    assert rich.code == 0 and "┃" in rich.out and "0.500000" in rich.out, rich
    # with --json stdout is one JSON document, table or not
    assert run_cli("plan", d, "--json", env={"FORCE_COLOR": "1"}).json()["mode"] == "mean"


@pytest.mark.parametrize("alias,canonical", [("bf16", "bfloat16"), ("half", "float16"), ("FP64", "float64"),
                                             ("float", "float32")])
def test_dtype_aliases(run, tmp_path, alias, canonical):
    d, files = run
    out = tmp_path / "avg.safetensors"
    res = run_cli(d, "-o", out, "--dtype", alias, "--json")
    assert res.code == 0, res
    doc = res.json()
    assert doc["dtype"] == canonical and doc["params"]["dtype"] == canonical
    assert doc["dtypes"] == {canonical: 3, "int64": 1}
    got, _ = load_st(out)
    want = np.dtype(ml_dtypes.bfloat16) if canonical == "bfloat16" else np.dtype(canonical)
    assert got["vars/2"].dtype == want and got["global_step"].dtype == np.int64


def test_tilde_and_vars_expanded_in_quoted_globs_and_output(run, tmp_path):
    d, files = run
    env = {"HOME": str(tmp_path), "CKDIR": str(d)}
    res = run_cli("~/ck/ckpt-*.safetensors", "--output=~/a.safetensors", "--json", env=env)
    assert res.code == 0, res
    doc = res.json()
    assert doc["output"] == str(tmp_path / "a.safetensors") and (tmp_path / "a.safetensors").is_file()
    assert [c["path"] for c in doc["checkpoints"]] == [str(f) for f in files]
    res = run_cli("plan", "$CKDIR/*.safetensors", "--json", env=env)
    assert res.code == 0 and len(res.json()["checkpoints"]) == 3, res


def test_json_paths_absolute_and_verified(run, tmp_path):
    d, files = run
    res = run_cli("ck/ckpt-1.safetensors", "ck/ckpt-2.safetensors", "-o", "out/", "--verify", "--json", cwd=tmp_path)
    assert res.code == 0, res
    doc = res.json()
    paths = [doc["output"], doc["newest"], *doc["files"], *(c["path"] for c in doc["checkpoints"])]
    assert all(os.path.isabs(p) for p in paths), paths
    assert doc["output"] == str(tmp_path / "out") and doc["verified"] is True
    res = run_cli(d, "-o", tmp_path / "v.safetensors", "--verify", env={"FORCE_COLOR": "1", "COLUMNS": "300"})
    assert res.code == 0 and "verified" in res.err and "wrote" in res.err, res
    res = run_cli(d, "-o", tmp_path / "n.safetensors", "--json")
    assert res.json()["verified"] is False


def test_error_with_json_is_a_json_document_on_stdout(run, tmp_path):
    d, files = run
    missing = tmp_path / "nope.safetensors"
    res = run_cli(missing, "-o", tmp_path / "o.safetensors", "--json")
    line = assert_clean_error(res, str(missing), code=1)
    err = res.json()["error"]
    assert err == {"message": line[len("error: "):], "path": str(missing), "tensor": None, "exit_code": 1}
    # a tensor-level error names the tensor
    save_st(d / "ckpt-4.safetensors", {"vars/10": np.zeros(5, np.float32), "vars/2": np.zeros(4, np.float32),
                                       "dense/kernel": np.zeros((25, 20), np.float32),
                                       "global_step": np.array(400, np.int64)})
    res = run_cli("plan", d, "--json")
    assert res.code == 1 and res.json()["error"]["tensor"] == "vars/10", res
    # usage errors too (exit 2)
    res = run_cli(d, "-o", tmp_path / "o.safetensors", "--dtype", "int3", "--json")
    assert res.code == 2 and res.json()["error"]["exit_code"] == 2 and "--dtype" in res.json()["error"]["message"]


def test_outputs_never_create_parent_directories_but_create_themselves(run, tmp_path):
    """One rule for every writer: the output (file, TF prefix, directory) is created,
    its parent directory must exist."""
    d, files = run
    for out in (tmp_path / "missing" / "model.ckpt", tmp_path / "missing" / "a.safetensors",
                tmp_path / "missing" / "a.h5"):
        assert_clean_error(run_cli(d, "-o", out), "does not exist", "never its parent", code=1)
        assert not (tmp_path / "missing").exists()
    res = run_cli(d, "-o", f"{tmp_path / 'tfdir'}/", "--format", "tf", "--quiet")
    assert res.code == 0 and (tmp_path / "tfdir" / "model.ckpt.index").is_file(), res
    res = run_cli(d, "-o", tmp_path / "shards", "--max-shard-size", "1kB", "--quiet")
    assert res.code == 0 and (tmp_path / "shards" / "model.safetensors.index.json").is_file(), res


def _in_bash(*args, env=None):
    """``python -m ema_cli ARGS`` started by bash, as from a terminal: typer finds
    the user's shell from the parent processes (shellingham), so the test must not
    depend on what started pytest (``; true`` keeps bash from exec'ing)."""
    import shlex
    import subprocess
    import sys

    e = dict(os.environ, **(env or {}))
    cmd = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "ema_cli", *args)) + "; true"
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=e, timeout=120)


def test_shell_completion(tmp_path):
    res = _in_bash("--show-completion")
    assert res.returncode == 0 and "_EMA_AVG_COMPLETE" in res.stdout and "complete -o default" in res.stdout, res
    res = _in_bash("--install-completion", env={"HOME": str(tmp_path), "SHELL": "/bin/bash"})
    assert res.returncode == 0, res
    script = tmp_path / ".bash_completions" / "ema-avg.sh"
    assert script.is_file() and str(script) in (tmp_path / ".bashrc").read_text(), res
    assert "_EMA_AVG_COMPLETE" in script.read_text()
    res = run_cli(env={"_EMA_AVG_COMPLETE": "complete_bash", "COMP_WORDS": "ema-avg ins", "COMP_CWORD": "1"})
    assert res.code == 0 and res.out.split() == ["inspect"], res
    res = run_cli(env={"_EMA_AVG_COMPLETE": "complete_bash", "COMP_WORDS": "ema-avg average --half",
                       "COMP_CWORD": "2"})
    assert res.code == 0 and "--half-life" in res.out.split(), res


def test_version_answered_early():
    res = run_cli("--version")
    assert res.code == 0 and res.out.strip() == "ema-avg 0.1.0" and res.err == ""
    assert json.dumps(run_cli("-V").out.strip()) == json.dumps("ema-avg 0.1.0")


@pytest.mark.parametrize("annotation", ["int", "float", "str", "bool", "Optional[int]", "Optional[float]", "List[str]"])
def test_plain_option_coercion_matches_typers_pydantic_coercion(annotation):
    """``_typer_plain`` (the CLI's options without pydantic) gives what typer's own
    pydantic coercion gives, values and error messages, on the same inputs."""
    from typing import List, Optional  # noqa: F401  (eval'd below)

    import typer
    from typer import _coercion, core
    from typer._click.exceptions import BadParameter
    from typer.models import OptionInfo

    from ema_cli import _typer_plain

    _typer_plain.install()
    ann = eval(annotation)
    desc = _coercion.resolve_type_descriptor(ann, OptionInfo())
    ours = core.build_runtime_param(desc)
    theirs = _coercion.build_runtime_param(desc)
    assert type(ours).__name__ == "PlainRuntimeParam" and type(theirs).__name__ != "PlainRuntimeParam"
    multi = annotation.startswith("List")
    param = typer.core.TyperOption(param_decls=["--x"], type_descriptor=desc, multiple=multi) \
        if hasattr(typer.core, "TyperOption") else None
    values = ["1", "-3", " 7 ", "1_000", "2.0", "2.5", "1e3", "0x10", "abc", "", "nan", "inf", "-0", "true",
              "False", "yes", "off", "1.5e-3", "+4", "1.", "1e400", "on ", "T", "No", "01", " 1_0 ", "1__0", "_1",
              "\u0661", "2.00", "-2.0", "1_0.0", " 1_0", "\t3\n"]
    for v in values:
        arg = [v, v] if multi else v

        def run(rt):
            try:
                return ("ok", rt._coerce_value(arg, param=param, ctx=None))
            except BadParameter as e:
                return ("error", e.message)

        a, b = run(ours), run(theirs)
        if a[0] == "ok" and b[0] == "ok" and isinstance(a[1], float) and a[1] != a[1]:
            assert b[1] != b[1], (annotation, v)
            continue
        assert a == b, (annotation, v, a, b)


def test_command_names_match_the_commands_typer_builds():
    """The CLI names the subcommands without building them (start-up time): the
    names must be exactly the ones typer gives the click commands."""
    import typer

    from ema_cli import cli

    built = set(typer.main.get_command(cli.app).commands)
    assert cli._command_names() == built
    assert {"average", "plan", "inspect", "posthoc", "restore-map", "rename"} <= built


def test_a_run_builds_only_its_command_and_parses_like_the_whole_app(run):
    """``ema-avg NAME ...`` runs an app holding only NAME (start-up time): its help,
    its usage errors and its output are the whole app's, for every subcommand."""
    import typer
    from typer.testing import CliRunner

    from ema_cli import cli

    d, files = run
    for name in cli._command_names():
        sub = cli._app_for(name)
        assert set(typer.main.get_command(sub).commands) == {name}
        for args in ([name, "--help"], [name, "--no-such-option"], [name, *map(str, files)]):
            whole = CliRunner().invoke(cli.app, args, prog_name="ema-avg")
            alone = CliRunner().invoke(sub, args, prog_name="ema-avg")
            assert (alone.exit_code, alone.output) == (whole.exit_code, whole.output), (args, alone.output)
        assert "Usage: ema-avg " + name in CliRunner().invoke(sub, [name, "--help"], prog_name="ema-avg").output


def test_a_safetensors_run_imports_no_other_format(run, tmp_path):
    """The registry imports a format's module only when it is asked: averaging
    safetensors into safetensors leaves the TF, Keras, HDF5 and torch modules out."""
    import subprocess
    import sys

    d, files = run
    code = ("import sys; from ema_cli import cli\n"
            "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print(sorted(m for m in sys.modules if m.startswith('ema_cli.formats.')))")
    out = subprocess.run([sys.executable, "-c", code, *map(str, files), "-o", str(tmp_path / "avg.safetensors"),
                          "--quiet"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['ema_cli.formats.base', 'ema_cli.formats.safetensors_fmt']", out


def test_the_command_line_imports_with_the_collector_paused_and_leaves_it_on(run, tmp_path):
    """The entry point imports the CLI without garbage collections, freezes what the
    imports made, and runs the job with the collector on; a small model's run starts
    no thread pool (concurrent.futures stays unimported)."""
    import subprocess
    import sys

    d, files = run
    code = ("import gc, sys\n"
            "from ema_cli import _entry\n"
            "counts = []\n"
            "gc.callbacks.append(lambda phase, info: phase == 'start' and counts.append(info['generation']))\n"
            "main = _entry._import_cli()\n"
            "assert not counts, counts\n"
            "assert gc.isenabled() and gc.get_freeze_count() > 10000, gc.get_freeze_count()\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert gc.isenabled()\n"
            "print('concurrent.futures' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *map(str, files), "-o", str(tmp_path / "avg.safetensors"),
                          "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout
