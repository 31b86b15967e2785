"""The method of a masks file comes from its metadata, not from its file name."""

import pytest
from tiny_models import random_masks

from gravity_sparse.errors import UserError
from gravity_sparse.model.masks import write_masks
from gravity_sparse.run.config import load_config
from gravity_sparse.run.pipeline import PipelineConfig
from gravity_sparse.stages import common
from gravity_sparse.stages.s3_apply.apply import masks_in


def _solve_folder(tmp_path, files: dict[str, str]):
    from gravity_sparse.run.artifacts import stage_folder

    with stage_folder(tmp_path, "solve", config={}) as sf:
        for name, method in files.items():
            masks = random_masks()
            masks.method = method
            write_masks(masks, sf.path / name)
    return sf.final


def test_labels_are_the_stored_methods(tmp_path):
    folder = _solve_folder(
        tmp_path,
        {
            "masks.safetensors": "qubo-sa",
            "masks_a.safetensors": "window",
            "masks_b.safetensors": "greedy",
        },
    )
    found = masks_in(folder)
    assert list(found) == ["qubo", "window", "greedy"]
    assert found["window"].name == "masks_a.safetensors"
    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path}", "masks=greedy"])
    assert common.pattern_file(cfg).name == "masks_b.safetensors"
    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path}", "masks=random"])
    with pytest.raises(UserError, match="no masks of method 'random'"):
        common.pattern_file(cfg)


def test_two_files_of_one_method_are_refused(tmp_path):
    folder = _solve_folder(
        tmp_path, {"masks.safetensors": "qubo-sa", "masks_greedy.safetensors": "qubo-sa"}
    )
    with pytest.raises(UserError, match="both hold 'qubo'"):
        masks_in(folder)
