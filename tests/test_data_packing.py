"""Packing keeps examples apart (the loss of an example in a pack is its loss alone), and the collators."""
import numpy as np
import pytest
import torch

from ftlib.data import preprocess
from ftlib.data.collate import PackedCollator, make_collator, padding_fraction, row_lengths
from ftlib.data.merge import load_splits
from ftlib.data.packing import best_fit
from tests.conftest import SAMPLE_DATA, TINY_MODEL

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32).eval()


@pytest.fixture
def splits(make_recipe):
    def make(packing: bool):
        recipe = make_recipe(f"data.sources=[{{path: '{SAMPLE_DATA}', format: alpaca, max_rows: 120}}]",
                             "data.sequence_len=512", f"data.packing={str(packing).lower()}")
        preprocess.run_shard(recipe, 0, 1)
        return recipe, load_splits(recipe)

    return make


def examples_of(pack):
    """[(start, end)] of the examples in a pack: where the position ids restart."""
    starts = [i for i, p in enumerate(pack["position_ids"]) if p == 0] + [len(pack["input_ids"])]
    return list(zip(starts, starts[1:]))


def test_best_fit_by_hand():
    assert best_fit(np.array([5, 3, 4, 2, 6]), 8) == [[0, 1], [2, 3], [4]]
    assert best_fit(np.array([8, 8]), 8) == [[0], [1]]


def test_packs_hold_every_example_once(splits):
    _, (train, evaluation) = splits(False)
    recipe, (packed, packed_eval) = splits(True)
    assert packed.column_names == ["input_ids", "labels", "position_ids"]
    assert len(packed) < len(train) and max(row_lengths(packed)) <= recipe.data.sequence_len
    pieces = sorted(tuple(p["input_ids"][a:b]) for p in packed for a, b in examples_of(p))
    assert pieces == sorted(tuple(r) for r in train["input_ids"])
    assert sum(len(examples_of(p)) for p in packed_eval) == len(evaluation)


@torch.no_grad()
def test_loss_of_an_example_in_a_pack_equals_its_loss_alone(splits, model):
    _, (packed, _) = splits(True)
    pack = next(p for p in packed if len(examples_of(p)) >= 2)
    ids = torch.tensor([pack["input_ids"]])
    positions = torch.tensor([pack["position_ids"]])
    for a, b in examples_of(pack):
        alone = model(input_ids=ids[:, a:b], labels=torch.tensor([pack["labels"][a:b]]), use_cache=False).loss
        only_this = torch.full_like(ids, -100)
        only_this[0, a:b] = torch.tensor(pack["labels"][a:b])
        packed_loss = model(input_ids=ids, position_ids=positions, labels=only_this, use_cache=False).loss
        assert packed_loss.item() == pytest.approx(alone.item(), abs=1e-5)
    # The check can fail: with an attention mask instead, the last example attends to the others.
    leaky = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids), labels=only_this,
                  use_cache=False).loss
    assert abs(leaky.item() - alone.item()) > 1e-3


@torch.no_grad()
def test_packed_collator_batches_keep_examples_apart(splits, model):
    recipe, (packed, _) = splits(True)
    from ftlib.model import load_tokenizer

    collate = make_collator(recipe, load_tokenizer(recipe))
    assert isinstance(collate, PackedCollator)
    rows = [packed[i] for i in range(3)]
    batch = collate(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: the mask comes from positions
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(len(r["input_ids"]) for r in rows)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        assert (batch["labels"][r, n:] == -100).all()
        assert batch["position_ids"][r, n:].tolist() == list(range(width - n))  # padding: a block of its own
        for a, b in examples_of(row):
            alone = model(input_ids=torch.tensor([row["input_ids"][a:b]]), use_cache=False).logits
            assert torch.allclose(logits[r, a:b], alone[0], atol=1e-4)


def test_notebook_collator_and_padding_fraction(splits):
    recipe, (train, _) = splits(False)
    from ftlib.model import load_tokenizer

    tokenizer = load_tokenizer(recipe)
    side = tokenizer.padding_side
    rows = [train[i] for i in range(4)]
    batch = make_collator(recipe, tokenizer)(rows)
    assert tokenizer.padding_side == side  # the caller's tokenizer is left as it was
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (4, -(-longest // 8) * 8)
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][r, :n].tolist() == row["input_ids"] and batch["attention_mask"][r, n:].sum() == 0
        assert batch["labels"][r, :n].tolist() == row["labels"] and (batch["labels"][r, n:] == -100).all()
    # Micro-batches [3, 5] -> 2 x 8 slots, [8, 10] -> 2 x 16: 26 tokens in 48 slots.
    assert padding_fraction([3, 5, 8, 10], 2) == pytest.approx(1 - 26 / 48)
    assert padding_fraction([8, 8, 16], 2) == 0.0 and padding_fraction([8, 8, 16], 4) == pytest.approx(1 / 3)


def test_pack_to_packs_the_same_examples_into_longer_rows(make_recipe):
    """data.pack_to: rows of pack_to tokens holding the examples that data.sequence_len cut, unchanged."""
    def splits(*overrides):
        recipe = make_recipe(f"data.sources=[{{path: '{SAMPLE_DATA}', format: alpaca, max_rows: 120}}]",
                             "data.sequence_len=256", *overrides)
        preprocess.run_shard(recipe, 0, 1)
        return load_splits(recipe)[0]

    examples = splits()
    short, long = splits("data.packing=true"), splits("data.packing=true", "data.pack_to=1024")
    assert max(row_lengths(short)) <= 256 < max(row_lengths(long)) <= 1024 and len(long) < len(short) / 3
    pieces = sorted(tuple(p["input_ids"][a:b]) for p in long for a, b in examples_of(p))
    assert pieces == sorted(tuple(r) for r in examples["input_ids"])
    assert max(b - a for p in long for a, b in examples_of(p)) <= 256
