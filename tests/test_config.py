"""Config resolution: presets, flags, typed key=value overrides, clear errors for bad keys."""

from __future__ import annotations

import pytest
import yaml

from raydrive.config import ConfigError
from raydrive.launch.train import build_parser, resolve_config


def cfg_for(*argv):
    return resolve_config(build_parser().parse_intermixed_args(["sparse4d", *argv]))


def test_presets_and_flags():
    small = cfg_for()
    assert small.preset == "small" and small.model.embed_dims == 64
    full = cfg_for("--dataroot", "/data/nuscenes")
    assert full.preset == "full" and full.model.num_anchor == 900 and full.run.batch_size == 6
    assert full.optim.lr_mults == {"img_backbone": 0.5} and full.data.skip_prob == 0.5
    flagged = cfg_for("--num-workers", "4", "--batch-size", "1", "--no-eval", "--precision", "bf16")
    assert (flagged.run.num_workers, flagged.run.batch_size, flagged.run.evaluate) == (4, 1, False)
    assert flagged.run.global_batch == 4  # the preset's, kept whatever the worker count
    with pytest.raises(ConfigError, match="cannot be split over 3 worker"):
        cfg_for("--num-workers", "3")


def test_overrides_are_typed():
    cfg = cfg_for(
        "optim.lr=3e-4",
        "model.num_anchor=120",
        "mapper.bev_rot=(-0.1,0.1)",
        "run.max_steps=none",
        "mapper.photometric=false",
        "optim.lr_mults={img_backbone: 0.1}",
    )
    assert cfg.optim.lr == 3e-4 and cfg.model.num_anchor == 120 and cfg.mapper.bev_rot == (-0.1, 0.1)
    assert cfg.run.max_steps is None and cfg.mapper.photometric is False and cfg.optim.lr_mults == {"img_backbone": 0.1}
    assert yaml.safe_load(cfg.to_yaml())["optim"]["lr"] == 3e-4


def test_unknown_key_lists_close_matches():
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'; did you mean optim.lr"):
        cfg_for("optim.lrr=1")
    with pytest.raises(ConfigError, match="did you mean model.num_anchor"):
        cfg_for("num_anchor=3")
    with pytest.raises(ConfigError, match="expects int"):
        cfg_for("run.epochs=two")
    with pytest.raises(ConfigError, match="must be smaller than num_anchor"):
        cfg_for("model.num_temp_instances=5000")
    with pytest.raises(ConfigError, match="not key=value"):
        cfg_for("optim.lr")
    with pytest.raises(ConfigError, match="'data.flip_prob' is now 'data.reverse_prob'"):
        cfg_for("data.flip_prob=0.1")
    with pytest.raises(ConfigError, match="has no preset 'tiny'.*full, small"):
        cfg_for("--preset", "tiny")


def test_public_api():
    import raydrive

    assert "sparse4d" in raydrive.list_models()
    model = raydrive.build_model("sparse4d", preset="small", num_anchor=64, num_temp_instances=32)
    assert model.head.instance_bank.anchor.shape == (64, 11)


def test_stages_start_where_asked_and_load_from_feeds_the_first_one(tmp_path):
    from raydrive.launch.train import DONE_FILE, _stage_checkpoint, resolve_stages

    def stages(*argv):
        return resolve_stages(build_parser().parse_intermixed_args(["sparsedrive", "--name", "sd", *argv]))

    both = stages("--load-from", "/w/stage1.pth")
    assert [(c.preset, c.run.name, c.run.load_from) for c in both] == [
        ("small_stage1", "sd-small_stage1", "/w/stage1.pth"),
        ("small_stage2", "sd-small_stage2", "stage:small_stage1"),  # not the stage-1 weights again
    ]
    (second,) = stages("--stage", "2", "--load-from", "/w/stage1.pth")
    assert (second.preset, second.run.name, second.run.load_from) == (
        "small_stage2",
        "sd-small_stage2",
        "/w/stage1.pth",
    )
    with pytest.raises(ConfigError, match=r"--stage 3: .* stages 1-2"):
        stages("--stage", "3")

    (second,) = stages("--stage", "2")  # from stage 1's final checkpoint of the same run
    with pytest.raises(ConfigError, match="stage small_stage1 has not finished in this run"):
        _stage_checkpoint(second, tmp_path, "small_stage1")
    final = tmp_path / "sd-small_stage1" / "checkpoint_x"
    final.parent.mkdir()
    (final.parent / DONE_FILE).write_text(f'{{"checkpoint": "{final}"}}')
    with pytest.raises(ConfigError, match="incomplete"):  # the folder is not a complete checkpoint
        _stage_checkpoint(second, tmp_path, "small_stage1")
