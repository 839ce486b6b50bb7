import pytest

from usae.side_by_side import Training


def test_a_training_names_one_sae_and_rejects_what_it_cannot_train():
    assert Training().label() == "USAE"
    assert Training(init="official").label() == "USAE (init=official)"
    assert Training(model="toy_vit", changes=(("steps", 30),)).label() == "SAE toy_vit (steps=30)"
    with pytest.raises(ValueError, match="only valid for the USAE"):
        Training(model="toy_vit", init="official")
    with pytest.raises(ValueError, match=r"changes = .* is not valid"):
        Training(changes={"steps": 3})
