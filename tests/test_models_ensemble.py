import pytest
import torch

from cnnbench.models import Ensemble, create_model


def _members():
    torch.manual_seed(0)
    return [create_model("resnet18", 6, width_mult=0.125).eval(),
            create_model("xception_small", 6, width_mult=0.125).eval()]


def test_forward_is_the_sum_of_member_logits():
    members = _members()
    ensemble = Ensemble(members).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = members[0](x) + members[1](x)
        torch.testing.assert_close(ensemble(x), expected)
        features = ensemble.forward_features(x)
        assert isinstance(features, list) and len(features) == 2
        for member, feature in zip(members, features):
            torch.testing.assert_close(feature, member.forward_features(x))
        torch.testing.assert_close(ensemble.forward_head(features), expected)
    assert ensemble.classifiers == [members[0].classifier, members[1].classifier]


def test_members_must_share_the_label_set():
    with pytest.raises(ValueError, match=r"disagree on the number of classes: \[6, 7\]"):
        Ensemble([create_model("resnet18", 6, width_mult=0.125), create_model("resnet18", 7, width_mult=0.125)])
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])
