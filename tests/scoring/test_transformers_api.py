"""The fast scorer calls transformers' create_causal_mask under the argument names the installed
version supports, so it neither warns now nor breaks when a deprecated name goes."""

from __future__ import annotations

import warnings

import torch

from alora_ds.scoring.fast import LlamaStack, _cache_argument
from tests.helpers import scored_model


def test_the_causal_mask_is_built_without_a_deprecation_warning():
    model, _ = scored_model()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # a padded row: the mask must be a real one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' FutureWarning would raise here
        ctx = LlamaStack(model).context({"input_ids": ids, "attention_mask": mask})
    assert ctx["mask"] is not None


def test_the_cache_argument_follows_the_signature():
    def new(config, inputs_embeds, attention_mask, cache, position_ids=None): ...

    def old(config, inputs_embeds, attention_mask, *, past_key_values, position_ids=None): ...

    assert (_cache_argument(new), _cache_argument(old)) == ("cache", "past_key_values")
