"""The KL-estimator study runs, and its three closed forms hold exactly (k1: zero expected gradient; k2 and k3+:
the exact gradient; k3: the reverse KL's gradient)."""
from benchmarks import kl_estimators


def test_kl_estimators_study_closed_forms():
    result = kl_estimators.main(["--vocab", "12", "--scales", "0.1", "2.0", "--seeds", "3"])
    for row in result["rows"]:
        assert abs(row["k1_rel_err"] - 1.0) < 1e-9  # E[grad k1] = 0
        assert row["k2_rel_err"] < 1e-9 and row["k3+_rel_err"] < 1e-9
        assert row["k3_minus_reverse_kl_grad"] < 1e-12
        assert row["k3_rel_err"] > 1e-3  # biased for the forward KL
