import math
import re
import warnings

import pytest
import torch

from s2m_diffusers.maths import log_r, log_w
from s2m_diffusers.targets import TargetError, parse_target
from s2m_diffusers.testing.toy import ToyProblem

NAMES = ["black_hair", "male", "smiling"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("black_hair & male & ~smiling", "black_hair & male & ~smiling"),
        ("black_hair+male-smiling", "black_hair & male & ~smiling"),
        ("black_hair | male", "black_hair | male"),
        ("black_hair & (male | smiling)", "black_hair & (male | smiling)"),
        ("!smiling", "~smiling"),
        ("~~male & smiling", "male & smiling"),
        ("(black_hair & male) | ~smiling", "black_hair & male | ~smiling"),
    ],
)
def test_parse_forms(text, expected):
    assert str(parse_target(text, NAMES)) == expected


def test_present_absent_and_stages():
    t = parse_target("~smiling & black_hair & male", NAMES)
    assert t.is_conjunction and t.present == ["black_hair", "male"] and t.absent == ["smiling"]
    assert [str(s) for s in t.stages()] == ["black_hair", "black_hair & male", "black_hair & male & ~smiling"]
    assert [str(s) for s in parse_target("male | smiling", NAMES).stages()] == ["male | smiling"]
    assert not parse_target("male | smiling", NAMES).is_conjunction


@pytest.mark.parametrize(
    "text, message",
    [
        ("black_hiar & male", "Did you mean 'black_hair'"),
        ("", "empty"),
        ("   ", "empty"),
        ("male &", "Unexpected end"),
        ("male smiling", "operator missing"),
        ("(male & smiling", "Missing ')'"),
        ("male $ smiling", "Unexpected character '$'"),
        ("male & ~male", "both requires and forbids ['male']"),
        ("~black_hair & ~male & ~smiling", "can never hold"),
        ("male & ) ", "Expected an attribute name"),
    ],
)
def test_errors_teach(text, message):
    with pytest.raises(TargetError, match=re.escape(message)):
        parse_target(text, NAMES)


def test_unknown_attribute_lists_known_names():
    with pytest.raises(TargetError) as err:
        parse_target("glasses", NAMES)
    assert "Known attributes: ['black_hair', 'male', 'smiling']" in str(err.value)


def test_holds_matches_boolean_logic():
    t = parse_target("black_hair & (male | smiling) & ~smiling", NAMES)
    assert t.holds(["black_hair", "male"])
    assert not t.holds(["black_hair", "male", "smiling"])
    assert t.holds([True, True, False]) and not t.holds([True, False, False])
    attrs = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert t.holds_batch(attrs).tolist() == [True, False, False]


TOY = ToyProblem()
TOY_TARGETS = ["A & ~B & ~C", "A & B & C", "A & C & ~B", "A | B", "~A", "A & (B | C)", "~(A & B)", "B - A", "~A | C"]


@pytest.mark.parametrize("text", TOY_TARGETS)
@pytest.mark.parametrize("margin", [1.0, 10.0])
def test_exact_heads_give_exact_ratio(text, margin):
    """With exact heads, r_T(x) = h(x) 1[x satisfies T] (spec §3) for any formula and any margin >= 1."""
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn((4000, 2), generator=g, dtype=torch.float64)
    target = TOY.target(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lr = log_r(target, TOY.dr_log_probs(x), torch.log(TOY.p_data), torch.log(TOY.priors), margin)
    holds = TOY.holds(target, x)
    assert torch.equal(torch.isfinite(lr), holds)
    assert not torch.isnan(lr).any()
    log_h = TOY.log_p(x) - TOY.log_p_data_x(x)  # h = p / p_data
    torch.testing.assert_close(lr[holds], log_h[holds])


def test_negation_margin_is_the_paper_form_scaled():
    target = parse_target("a - b", ["a", "b"])
    dr = torch.log(torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.95, 0.05]], dtype=torch.float64))
    zero = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    for margin in (1.0, 2.0, 10.0):
        expected = torch.log((dr.exp()[:, 0] - margin * dr.exp()[:, 1]).clamp_min(0))
        torch.testing.assert_close(log_r(target, dr, zero, None, margin), expected)


def test_log_r_stable_in_extremes():
    target = parse_target("a & ~b", ["a", "b"])
    dr = torch.tensor([[0.0, -1e4], [-1e-30, -1e-30], [-800.0, -900.0], [-math.inf, 0.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = log_r(target, dr, torch.zeros(2, dtype=torch.float64))
    assert out[0] == 0.0 and out[1] == -math.inf and out[3] == -math.inf
    torch.testing.assert_close(out[2], torch.tensor(-800.0, dtype=torch.float64))


def test_log_r_checks_shapes_and_margin():
    target = parse_target("a", ["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        log_r(target, torch.zeros(3, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="negation_margin must be >= 1"):
        log_r(target, torch.zeros(3, 2), torch.zeros(2), negation_margin=0.5)


def test_log_w_conditional_needs_class_prior():
    with pytest.raises(ValueError, match="log_pg_class"):
        log_w(torch.zeros(2), torch.zeros(2), torch.zeros(2))
    out = log_w(torch.zeros(2), torch.ones(2), torch.full((2,), -1.0), math.log(0.5))
    torch.testing.assert_close(out, torch.full((2,), 2.0 + math.log(0.5)))


def test_tempering_leaves_exact_heads_unchanged_and_sharpens_soft_ones():
    from s2m_diffusers.maths import temper_dr

    # Exact heads: D_r uniform on the image's attribute set.
    exact = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64).log()
    for temperature in (0.2, 1.0, 3.0):
        torch.testing.assert_close(temper_dr(exact, temperature).exp(), exact.exp())
    soft = torch.tensor([[0.45, 0.45, 0.10]], dtype=torch.float64).log()
    sharp = temper_dr(soft, 0.2).exp()[0]
    assert sharp[2] < 1e-3 and abs(float(sharp[0]) - 0.5) < 1e-3
    with pytest.raises(ValueError, match="positive"):
        temper_dr(soft, 0.0)


def test_auto_temperature_sharpens_pure_conjunctions_only():
    from s2m_diffusers.maths import auto_dr_temperature

    names = ["a", "b", "c"]
    assert auto_dr_temperature(parse_target("a & b & c", names)) == 0.2
    assert auto_dr_temperature(parse_target("a & b", names)) == 0.2
    for text in ("a", "a & ~b", "a & b & ~c", "a | b", "~a"):
        assert auto_dr_temperature(parse_target(text, names)) == 1.0, text


def test_presence_margin_leaves_exact_heads_unchanged_and_drops_faint_attributes():
    names = ["a", "b", "c"]
    log_p_data = torch.full((3,), 1 / 3, dtype=torch.float64).log()
    # Exact heads: D_r uniform on every non-empty attribute set.
    sets = [s for s in range(1, 8)]
    exact = torch.tensor([[((s >> i) & 1) / bin(s).count("1") for i in range(3)] for s in sets], dtype=torch.float64)
    for text in ("a & b & c", "a & b", "a & ~b", "a | (b & ~c)", "~a"):
        target = parse_target(text, names)
        base = log_r(target, exact.log(), log_p_data, negation_margin=10.0)
        for kappa in (0.3, 1.0):
            torch.testing.assert_close(log_r(target, exact.log(), log_p_data, None, 10.0, kappa), base)
    soft = torch.tensor([[0.45, 0.45, 0.10], [0.40, 0.33, 0.27], [0.70, 0.25, 0.05]], dtype=torch.float64).log()
    abc = log_r(parse_target("a & b & c", names), soft, log_p_data, presence_margin=0.5)
    assert torch.isinf(abc[0]) and torch.isfinite(abc[1])  # c is faint in the first image, not in the second
    assert torch.isfinite(log_r(parse_target("a & b & c", names), soft, log_p_data)[0])  # kappa = 0: the paper's
    # A negated attribute is not masked: a faint b still blocks `a & ~b` as the negation margin says.
    not_b = log_r(parse_target("a & ~b", names), soft, log_p_data, None, 30.0, 0.5)
    assert torch.isinf(not_b[2])
    with pytest.raises(ValueError, match="presence_margin"):
        log_r(parse_target("a", names), soft, log_p_data, presence_margin=1.5)


def test_log_weight_is_temper_then_log_r_then_log_w():
    from s2m_diffusers.maths import log_p_data, log_priors, log_weight, temper_dr

    names = ["A", "B", "C"]
    g = torch.Generator().manual_seed(0)
    dr = torch.log_softmax(torch.randn(50, 3, generator=g), 1)
    dv, df = torch.randn(50, generator=g), torch.log_softmax(torch.randn(50, 3, generator=g), 1)[:, 1]
    lp, lpi = log_p_data([10, 20, 30], 3), log_priors([0.5, 0.3, 0.4], 3)
    target = parse_target("A & ~C", names)
    manual = log_r(target, temper_dr(dr.double(), 0.5), lp, lpi, 3.0, 0.2)
    assert torch.equal(log_weight(target, dr, dv, lp, lpi, 3.0, 0.2, 0.5), log_w(manual, dv.double()))
    conditional = log_weight(target, dr, dv, lp, lpi, 3.0, 0.2, 0.5, df_log_prob=df, log_pg_class=-1.2)
    assert torch.equal(conditional, log_w(manual, dv.double(), df.double(), -1.2))
    assert torch.allclose(log_p_data(None, 4).exp(), torch.full((4,), 0.25, dtype=torch.float64))
    assert log_priors(None, 3) is None
    with pytest.raises(ValueError, match="priors has 2 entries"):
        log_priors([0.5, 0.5], 3)
