"""tiny-sentiment's prompts: eval openings are never train openings, deterministic per seed.

The grammar's 2–4-word openings are few and skewed (89 two- and three-word strings hold 2/3 of the
mass), so prompts drawn independently for train and eval share strings: at v2, 234 of the 256 eval
prompts of seed 0 (238 of seed 1) were also train prompts.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest

from envs import ENVS

ENV = ENVS.get("tiny-sentiment")


@pytest.mark.parametrize("seed", [0, 1])
def test_no_eval_prompt_is_a_train_prompt(seed, tmp_path):
    params = ENV.params_cls()  # the default params: the quick suite's prompts too (it only sets sft_epochs)
    ENV.build(params, seed, tmp_path)
    prompts = json.loads((tmp_path / "prompts.json").read_text())
    assert len(prompts["eval"]) == params.num_eval_prompts == 256
    assert len(prompts["train"]) == params.num_train_prompts == 2_000
    shared = sorted(set(prompts["eval"]) & set(prompts["train"]))
    assert shared == [], f"{len(shared)} eval prompt strings are also train prompts, e.g. {shared[:3]}"


def test_prompts_are_deterministic_per_seed_and_eval_ones_keep_the_natural_opening_mix():
    from envs.tiny_sentiment import make_prompts

    params = ENV.params_cls()
    first = make_prompts(params, 0)
    assert make_prompts(params, 0) == first
    assert make_prompts(params, 1)["eval"] != first["eval"]
    # the eval prompts of a seed are drawn first, on their own stream: env size does not move them
    smaller = dataclasses.replace(params, num_reviews=10, num_train_prompts=7)
    assert make_prompts(smaller, 0)["eval"] == first["eval"]
    # eval prompts are an i.i.d. sample of openings (2, 3 and 4 words alike, ~1/3 each), not only
    # the rarer 4-word ones that a "never seen in train" filter on the eval side would leave
    lengths = Counter(len(p.split()) for p in first["eval"])
    assert set(lengths) == {2, 3, 4} and min(lengths.values()) >= 0.2 * params.num_eval_prompts
    assert all(2 <= len(p.split()) <= 4 for p in first["train"])


def test_eval_prompts_that_leave_no_openings_for_training_are_a_one_line_error(tmp_path):
    # 30,000 eval draws cover the openings that hold ~99 % of the mass: 50 train prompts are not found
    params = ENV.params_cls(num_reviews=10, num_eval_prompts=30_000, num_train_prompts=50)
    with pytest.raises(ValueError, match=r"^num_eval_prompts: 30000 eval prompts leave too few other openings") as e:
        ENV.build(params, 0, tmp_path)
    assert "\n" not in str(e.value)
