"""research.versus: the seed-0 run a train.seeds model holds is its fold members' seed 0 alone."""

from __future__ import annotations

import torch
from conftest import tiny_params

from busiseg.modeling.archs import FoldEnsemble
from busiseg.modeling.model_file import load_model, save_model
from busiseg.modeling.registry import build_model
from busiseg.research.versus import first_seed_model


def test_the_first_seed_model_is_each_folds_seed_0_member(tmp_path):
    torch.manual_seed(0)
    config = build_model("unet", base=4, depth=2).config
    nested = FoldEnsemble([FoldEnsemble([build_model(**config) for _ in range(2)])
                           for _ in range(3)])
    (tmp_path / "models").mkdir()
    save_model(tmp_path / "models" / "model.pt", nested.state_dict(), config, tiny_params(), 32,
               members=3, seeds=2)
    loaded, blob = load_model(tmp_path / "models" / "model.pt")
    assert blob["seeds"] == 2
    single, one = load_model(first_seed_model(tmp_path, tmp_path / "seed0.pt"))
    assert one["members"] == 3 and "seeds" not in one
    x = torch.rand(2, 1, 32, 32)
    with torch.inference_mode():
        for k in range(3):
            assert torch.equal(single.members[k](x), loaded.members[k].members[0](x))
        assert not torch.equal(single(x)[0], loaded(x)[0])  # the second seed counted there
