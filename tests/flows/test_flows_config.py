"""Typed configs that fail fast: unknown keys, wrong types and out-of-range values are refused by ``load_config``
(and by the CLI before Prefect starts) with the field's dotted path and what is allowed; one resolution field; a
config written out by ``to_dict`` loads back to itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.config import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("raw, words", [
    # unknown keys, at every depth
    ({"diffusion": {"train": {"bogus_field": 1}}}, ["diffusion.train.bogus_field", "allowed", "lr"]),
    ({"evaluate": {"options": {"proxyy": {"epochs": 1}}}}, ["evaluate.options.proxyy", "proxy", "reconstruction"]),
    ({"evaluate": {"options": {"proxy": {"epochz": 1}}}}, ["evaluate.options.proxy.epochz", "epochs"]),
    ({"autoencoder": {"train": {"lrr": 1.0}}}, ["autoencoder.train.lrr", "lr"]),
    ({"autoencoder": {"phases": [{"phase": "full"}, {"stepz": 3}]}}, ["autoencoder.phases[1].stepz", "steps"]),
    ({"diffusion": {"train": {"adt": {"modes": "x"}}}}, ["diffusion.train.adt.modes", "mode"]),
    ({"data": {"synthetic": {"sizee": 3}}}, ["data.synthetic.sizee", "size"]),
    ({"evaluate": {"options": {"generation": {"kid_subsetz": 3}}}}, ["evaluate.options.generation.kid_subsetz",
                                                                     "kid_subsets"]),
    ({"evaluate": {"options": {"reconstruction": {"finetune": {"stepz": 3}}}}},
     ["evaluate.options.reconstruction.finetune.stepz", "steps"]),
    ({"resolutions": 64}, ["resolutions", "allowed", "resolution"]),
    # wrong types
    ({"diffusion": {"train": {"lr": "fast"}}}, ["diffusion.train.lr", "number", "'fast'"]),
    ({"diffusion": {"train": {"steps": 1.5}}}, ["diffusion.train.steps", "integer"]),
    ({"autoencoder": {"train": {"batch_size": "big"}}}, ["autoencoder.train.batch_size", "integer"]),
    ({"sample": {"cfg_scale": [1]}}, ["sample.cfg_scale", "number"]),
    ({"diffusion": {"backbones": "DiT-tiny"}}, ["diffusion.backbones", "list"]),
    ({"resolution": "big"}, ["resolution", "integer"]),
    # out of range / not among the allowed values
    ({"diffusion": {"train": {"lr": -1}}}, ["diffusion.train.lr", "> 0"]),
    ({"diffusion": {"train": {"adt": {"mode": "x"}}}}, ["diffusion.train.adt.mode", "per_batch", "per_sample"]),
    ({"diffusion": {"backbones": ["DiT-huge"]}}, ["diffusion.backbones", "DiT-tiny"]),
    ({"autoencoder": {"train": {"schedule": "steep"}}}, ["autoencoder.train.schedule", "cosine"]),
    ({"autoencoder": {"phases": [{"phase": "full"}, {"phase": "nope"}]}}, ["autoencoder.phases[1].phase", "refinement"]),
    ({"evaluate": {"options": {"reconstruction": {"lpips_net": "x"}}}}, ["evaluate.options.reconstruction.lpips_net",
                                                                         "alex"]),
    ({"evaluate": {"options": {"proxy": {"holdout": 2.0}}}}, ["evaluate.options.proxy", "holdout", "(0, 1)"]),
    ({"sample": {"precision": "fp8"}}, ["sample.precision", "bf16"]),
    ({"sample": {"sampler": "euler-maruyama"}}, ["sample.sampler", "heun", "ddim"]),
    ({"resolution": 4}, ["resolution", ">= 8"]),
])
def test_bad_values_are_refused_with_the_dotted_path_and_what_is_allowed(raw, words):
    with pytest.raises(ValueError) as err:
        load_config("tiny", raw)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_sections_are_the_library_dataclasses():
    from dcae15.ae.recon_eval import ReconEvalConfig
    from dcae15.ae.train import AETrainConfig
    from dcae15.diffusion.train import DiffusionTrainConfig
    from dcae15.metrics.proxy import ProxyConfig

    cfg = load_config("demo", {"seed": 3})
    assert isinstance(cfg.diffusion.train, DiffusionTrainConfig) and cfg.diffusion.train.seed == 3
    assert cfg.diffusion.train.lr == 0.002 and cfg.diffusion.train.adt.enabled is False
    assert all(isinstance(p, AETrainConfig) for p in cfg.autoencoder.phases)
    assert isinstance(cfg.evaluate.options.proxy, ProxyConfig) and cfg.evaluate.options.proxy.epochs == 10
    assert isinstance(cfg.evaluate.options.reconstruction, ReconEvalConfig)
    assert load_config("tiny", {"diffusion": {"train": {"lr": "1e-4"}}}).diffusion.train.lr == 1e-4  # YAML 1.1's 1e-4


def test_ae_phases_are_the_recipe_the_flow_trained_before():
    """``autoencoder.phases`` resolves exactly as the flow resolved it (shared ``train`` fields, preset, seed, each
    phase's own defaults such as its learning rate)."""
    from dcae15.ae.recipe import phase_configs, resolve_phases

    ae = {"preset": "tiny-f4c8", "train": {"steps": 5, "resolution": 32},
          "phases": [{"phase": "full"}, {"phase": "refinement", "steps": 2}]}
    cfg = load_config("tiny", {"seed": 4, "autoencoder": ae})
    train = cfg.autoencoder.train  # tiny's autoencoder.train with these fields merged in
    assert train["steps"] == 5 and train["batch_size"] == 8
    expect = phase_configs(resolve_phases(ae["phases"], train, real_data=False), preset="tiny-f4c8", seed=4)
    assert cfg.autoencoder.phases == expect
    assert [p.lr for p in cfg.autoencoder.phases] == [6.4e-5, 5.4e-5] and cfg.autoencoder.phases[1].steps == 2


def test_one_resolution_sets_every_stage():
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert "resolution" in raw and "resolution" not in raw["encode"] and "resolution" not in raw["autoencoder"]["train"]
    assert "size" not in raw["data"]["synthetic"]
    cfg = load_config("demo", {"resolution": 64})
    assert cfg.data.synthetic["size"] == 64 and cfg.evaluate.options.reconstruction.resolution == 64
    assert [p.resolution for p in cfg.autoencoder.phases] == [64]
    paper = load_config("imagenet")  # the paper's phases keep their own sizes (512 px latent adaptation)
    assert paper.resolution == 256 and [p.resolution for p in paper.autoencoder.phases] == [256, 512, 256]
    with pytest.raises(ValueError, match="top-level 'resolution'"):
        load_config("tiny", {"encode": {"resolution": 64}})


@pytest.mark.parametrize("name", ["demo", "tiny", "imagenet"])
def test_to_dict_is_plain_yaml_and_loads_back_to_the_same_config(name):
    d = load_config(name).to_dict()
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    assert load_config(d).to_dict() == d


def test_cli_refuses_a_bad_set_before_prefect_is_imported():
    """`--set` goes through the same checks; the command exits with the field's path and never imports Prefect."""
    cases = ((["--set", "diffusion.train.bogus_field=1"], ["diffusion.train.bogus_field"]),
             (["--set", "diffusion.train.lr=fast"], ["diffusion.train.lr", "'fast'"]),
             (["--set", "evaluate.options.proxyy={epochs: 1}"], ["evaluate.options.proxyy"]))
    code = ("import json, sys\nfrom flows.cli import main\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        print('EXIT', e.code)\n"
            "print('prefect imported:', 'prefect' in sys.modules)\n")
    argvs = [["demo", "--config", "tiny", *bad] for bad, _ in cases]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120).stdout
    assert out.count("EXIT dcae15 demo: config error") == len(cases) and "prefect imported: False" in out, out
    for _, words in cases:
        for w in words:
            assert w in out, (w, out)


def test_evaluate_protocol_fixes_reference_and_extractor():
    """``evaluate.protocol`` (issue 31): ImageNet's default is the DC-AE 1.5 paper's (dc-gen), the demo's proxy stays
    proxy, ``auto`` picks adm for an ADM reference batch, and a protocol with the wrong reference or network is
    refused naming the field."""
    cfg = load_config("imagenet")
    assert (cfg.evaluate.protocol, cfg.evaluate.reference) == ("dc-gen", "train")
    assert cfg.evaluate.pr_reference.endswith("VIRTUAL_imagenet256_labeled.npz")
    assert load_config("tiny").evaluate.protocol == "proxy"
    adm = load_config("imagenet", {"evaluate": {"protocol": "auto", "pr_reference": None,
                                                "reference": "/w/VIRTUAL_imagenet256_labeled.npz"}})
    assert adm.evaluate.protocol == "adm"
    assert load_config(adm.to_dict()).evaluate.protocol == "adm"  # a resolved name loads back
    for raw, words in [
        ({"evaluate": {"protocol": "fid50k"}}, ["evaluate.protocol", "dc-gen", "adm"]),
        ({"evaluate": {"protocol": "adm", "pr_reference": None}}, ["evaluate.protocol adm", "evaluate.reference",
                                                                    "VIRTUAL"]),
        ({"evaluate": {"protocol": "dc-gen", "reference": "/w/v.npz"}}, ["evaluate.reference: train"]),
        ({"evaluate": {"protocol": "adm", "reference": "/w/v.npz"}}, ["evaluate.pr_reference", "dc-gen"]),
        ({"evaluate": {"pr_reference": "/w/v.txt"}}, ["evaluate.pr_reference", ".npz"]),
    ]:
        with pytest.raises(ValueError) as err:
            load_config("imagenet", raw)
        for w in words:
            assert w in str(err.value), (w, str(err.value))
    with pytest.raises(ValueError, match="evaluate.extractor: inception"):
        load_config("tiny", {"evaluate": {"protocol": "dc-gen"}})


def _tagged_fields(path: Path) -> dict[str, str]:
    """``{dotted.path: tag}`` of every ``key: value  # [tag] ...`` line of a YAML file (block mappings only: the
    items of a list are skipped)."""
    import re

    out, stack, skip_below = {}, [], None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if skip_below is not None:
            if indent > skip_below:
                continue
            skip_below = None
        if line.lstrip().startswith("-"):  # a list under the last key: its items are not fields of the section
            skip_below = stack[-1][0] if stack else 0
            continue
        m = re.match(r"^(\s*)([A-Za-z_][\w]*):\s*(.*)$", line)
        if not m:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        tag = re.search(r"#\s*\[(\w+)\]", m.group(3))
        if tag:
            out[".".join(k for _, k in stack)] = tag.group(1)
    return out


def _ids(cfg) -> dict[str, object]:
    """Every id a config field could enter, computed as the flows compute them: the latent store's id
    (``flows.encode``: the encode section less its ``_WHERE`` fields), the AE phases' chain fingerprints (their run
    directories), each backbone's run id (``flows.diffusion``: ``run_url_for`` of the training section), and the
    sample id of a checkpoint (``flows.sample``: the run id, the step, ``sample.spec()``). The dataset and AE
    fingerprints come from what the stage before wrote: placeholders here (the dataset's is checked by packing)."""
    import dataclasses

    from dcae15.ae.recipe import chain_fingerprints
    from flows import encode
    from flows.pointers import run_url_for
    from storage.fingerprint import short_id

    enc = {**dataclasses.asdict(cfg.encode), "resolution": cfg.resolution}
    for k in encode._WHERE:
        enc.pop(k)
    store_id = encode.latent_store_url("/root", {"fingerprint": "ae-fp"}, {"fingerprint": "data-fp"},
                                       enc).rstrip("/").rsplit("/", 1)[-1]
    train = cfg.diffusion.train.to_dict()
    runs = {b: run_url_for("/root", store_id, b, {**train, "model": b}, train["seed"]).rsplit("/", 1)[-1]
            for b in cfg.diffusion.backbones}
    return {"latent store id": store_id, "AE phases": chain_fingerprints(cfg.autoencoder.phases, "data-fp"),
            "diffusion run ids": runs, "sample ids": {b: short_id(r, 500000, cfg.sample.spec()) for b, r in runs.items()}}


def _other_value(value):
    """A different valid value of a [machine] field (halved sizes keep every divisibility the config checks)."""
    if isinstance(value, bool):
        return not value
    if not isinstance(value, (int, str)):
        raise AssertionError(f"no perturbation for {value!r}: extend _other_value")
    if isinstance(value, str):
        return {"cuda": "cpu"}.get(value, "cuda")
    return value // 2 if value > 1 else 2


def test_imagenet_tags_machine_fields_enter_no_run_or_sample_id(tmp_path):
    """Issue 31 item 3: a ``[machine]`` field of imagenet.yaml says how and where a stage runs, so it enters no id.
    Every [machine] field read from the file is changed, one at a time, and every id it could enter is computed as
    the flows compute it: the latent store id, the AE phases' chain fingerprints, the diffusion run ids, the sample
    ids — none moves; the ``data.*`` ones are packing arguments, so a small tree is packed with each changed and the
    dataset fingerprint stays. (The world size can change which random numbers are drawn: the file's header says
    so; it still names no other run.)"""
    import inspect

    from flows.config import CONFIG_DIR
    from storage.packing import pack_image_folder
    from storage.synthetic import make_shapes_dataset

    tags = _tagged_fields(CONFIG_DIR / "imagenet.yaml")
    raw = yaml.safe_load((CONFIG_DIR / "imagenet.yaml").read_text())
    assert tags["sample.sampler"] == "official" and tags["sample.precision"] != "machine"
    assert tags["diffusion.train.ema_warmup_steps"] == "official"  # DC-Gen / efficientvit EMA warm-up
    assert set(tags.values()) <= {"paper", "official", "ours", "machine"}, set(tags.values())
    cfg = load_config("imagenet")
    machine = sorted(p for p, t in tags.items() if t == "machine")
    assert len(machine) >= 14, f"the tag parser found only {machine}"
    ids = {"diffusion.train.": set(cfg.diffusion.train.identity()), "sample.": set(cfg.sample.spec()),
           "autoencoder.train.": set().union(*(set(p.identity()) for p in cfg.autoencoder.phases))}
    for path in machine:
        for prefix, fields in ids.items():
            if path.startswith(prefix):
                assert path[len(prefix):] not in fields, f"{path} is tagged [machine] but enters an id"
    # the other way round: every field a sample id is made of is tagged something else
    for field in cfg.sample.spec():
        assert tags.get(f"sample.{field}", "untagged") != "machine", field

    base, base_ids = cfg.to_dict(), _ids(cfg)
    data_fields = []
    for path in machine:
        *parents, leaf = path.split(".")
        node = raw
        for k in parents:
            node = node[k]
        over = {leaf: _other_value(node[leaf])}
        for k in reversed(parents):
            over = {k: over}
        changed = load_config("imagenet", over)
        assert changed.to_dict() != base, f"{path}: {over} changed nothing in the loaded config"
        assert _ids(changed) == base_ids, f"{path} is tagged [machine] but changes an id"
        if parents == ["data"]:
            data_fields.append(leaf)
    # data.*: packing arguments; the dataset fingerprint is of content and order, not of how it was packed
    assert data_fields and set(data_fields) <= set(inspect.signature(pack_image_folder).parameters), data_fields
    src = tmp_path / "src"
    make_shapes_dataset(str(src), num_classes=2, per_class=4, size=16, fmt="jpg")
    small = {"shard_bytes": 2000, "workers": 2, "read_threads": 1}  # each different from the file's, and cheap
    pack = {k: raw["data"][k] for k in data_fields} | {"workers": 1}
    first = pack_image_folder(str(src), str(tmp_path / "base"), progress=False, **pack)
    for leaf in data_fields:
        assert small[leaf] != pack[leaf], leaf
        info = pack_image_folder(str(src), str(tmp_path / leaf), progress=False, **{**pack, leaf: small[leaf]})
        assert info.fingerprint == first.fingerprint, f"data.{leaf} is tagged [machine] but changes the fingerprint"
    assert len(list((tmp_path / "shard_bytes").glob("shard-*.tar"))) > len(list((tmp_path / "base").glob("shard-*.tar")))
