"""Fast checks of the flow layer's plain parts: configs, the CLI parser, the torchrun launcher, code versioning."""

from __future__ import annotations

import sys

import pytest

from flows.config import load_config
from flows.launch import LaunchError, run_streaming, torchrun_command


def test_presets_load_and_validate():
    demo, tiny = load_config("demo"), load_config("tiny")
    assert demo.diffusion.backbones == ["SiT-tiny", "USiT-tiny"]  # both families, flow matching (issue 12)
    assert tiny.data.synthetic["per_class"] * tiny.data.synthetic["num_classes"] < demo.data.synthetic["per_class"] * 8
    over = load_config("tiny", {"diffusion": {"train": {"steps": 7}}, "root": "/x"})
    assert over.diffusion.train.steps == 7 and over.root == "/x"
    assert over.diffusion.train.global_batch_size == tiny.diffusion.train.global_batch_size  # merged, not replaced


@pytest.mark.parametrize("raw, words", [
    ({"diffusion": {"backbone": ["x"]}}, ["backbone", "diffusion", "allowed"]),
    ({"encoder": {}}, ["encoder", "allowed"]),
    ({"encode": {"workers": 0}}, ["encode.workers"]),
    ({"diffusion": {"launcher": "slurm"}}, ["launcher", "torchrun"]),
    ({"evaluate": {"extractor": "clip"}}, ["extractor", "proxy", "inception"]),
])
def test_bad_configs_name_the_field(raw, words):
    with pytest.raises(ValueError) as err:
        load_config(raw)
    for w in words:
        assert w in str(err.value)


def test_unknown_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a preset"):
        load_config(str(tmp_path / "nope.yaml"))


def test_cli_parses_every_stage_and_rejects_unknown_backbones(capsys):
    from flows.cli import build_parser

    p = build_parser()
    assert p.parse_args(["demo"]).command == "demo"
    # each command's own default: `rehearse` defaults to the rehearsal config, and that never leaks into the others
    assert [p.parse_args([c]).config for c in ("demo", "pipeline", "rehearse", "prepare")] == \
        ["demo", "demo", "rehearsal", "demo"]
    a = p.parse_args(["train-diffusion", "--store", "s3://b/latents/x", "--backbone", "USiT-tiny", "--nproc-per-node", "2",
                      "--torchrun-arg=--rdzv-endpoint=h:29500", "--root", "s3://b"])
    assert (a.backbone, a.nproc_per_node, a.torchrun_arg, a.root) == ("USiT-tiny", 2, ["--rdzv-endpoint=h:29500"], "s3://b")
    for cmd in ("pipeline", "prepare", "evaluate-new", "results"):
        assert p.parse_args([cmd, "--config", "tiny"]).config == "tiny"
    with pytest.raises(SystemExit):
        p.parse_args(["train-diffusion", "--store", "x", "--backbone", "DiT-huge"])
    assert "invalid choice" in capsys.readouterr().err
    # a backbone by import path (issue 33): parsed, imported only when the run starts
    a = p.parse_args(["train-diffusion", "--store", "x", "--backbone", "examples.lightning_dit:lightning_dit_tiny"])
    assert a.backbone == "examples.lightning_dit:lightning_dit_tiny"
    two = ["SiT-tiny", "my_lab.nets:make"]
    assert p.parse_args(["demo", "--backbones", *two]).backbones == two


def test_cli_set_overrides_become_nested_yaml_values():
    from flows.cli import _parse_set

    assert _parse_set(["diffusion.train.steps=200", "encode.flip=false", "diffusion.backbones=[DiT-tiny]"]) == {
        "diffusion": {"train": {"steps": 200}, "backbones": ["DiT-tiny"]}, "encode": {"flip": False}}
    with pytest.raises(SystemExit):
        _parse_set(["nonsense"])


def test_torchrun_command_single_and_multi_node():
    one = torchrun_command("dcae15.diffusion.train", ["--config", "c.yaml"], nproc_per_node=8)
    assert one[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=8" in one and "--standalone" in one
    assert one[-4:] == ["-m", "dcae15.diffusion.train", "--config", "c.yaml"]
    multi = torchrun_command("m", [], nproc_per_node=8, nnodes=4, extra=["--rdzv-backend=c10d", "--rdzv-endpoint=h:1"])
    assert "--nnodes=4" in multi and "--standalone" not in multi and "--rdzv-endpoint=h:1" in multi
    with pytest.raises(ValueError, match="nproc_per_node"):
        torchrun_command("m", [], nproc_per_node=0)


def test_run_streaming_passes_lines_and_reports_failures_with_the_tail():
    seen: list[str] = []
    run_streaming([sys.executable, "-c", "print('a'); print('b')"], log=seen.append)
    assert seen == ["a", "b"]
    code = "import sys\nfor i in range(100): print('line', i)\nsys.exit(3)"
    with pytest.raises(LaunchError) as err:
        run_streaming([sys.executable, "-c", code], log=lambda _: None, tail=5)
    msg = str(err.value)
    assert "exit status 3" in msg and "line 99" in msg and "line 94" not in msg


def test_code_version_is_stable_and_names_library_code():
    from flows.caching import code_version

    assert code_version() == code_version() and len(code_version()) == 16
