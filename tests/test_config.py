"""Profile validation: a bad value is refused at get_profile with the field and its valid range, not deep in training."""
from dataclasses import dataclass, fields

import pytest

from diffgr2_lite.config import PROFILES, ConfigError, Profile, get_profile, validate_profile


def test_builtin_profiles_are_valid():
    for name in PROFILES:
        assert validate_profile(get_profile(name)).name == name


@pytest.mark.parametrize("override, expected", [
    ({"block_size": 0}, "block_size=0 is invalid: must be an integer >= 1"),
    ({"batch_size": 2.5}, "batch_size=2.5 is invalid: must be an integer >= 1"),
    ({"seed": True}, "seed=True is invalid: must be an integer >= 0"),
    ({"ar_lr": -1e-3}, "ar_lr=-0.001 is invalid: must be a number > 0"),
    ({"cft_epochs": float("nan")}, "cft_epochs=nan is invalid: must be a number > 0"),
    ({"opd_tau": 1.5}, "opd_tau=1.5 is invalid: must be a number in (0, 1]"),
    ({"ar_ema": 1.0}, "ar_ema=1.0 is invalid: must be a number in [0, 1)"),
    ({"bench_taus": [0.9, 0.0]}, "bench_taus[1]=0.0 is invalid: must be a number in (0, 1]"),
    ({"sid_levels": ()}, "sid_levels=() must be a non-empty tuple"),
    ({"trace_ranks": "yes"}, "trace_ranks='yes' must be true or false"),
    ({"max_users": 0}, "max_users=0 is invalid: must be an integer >= 1"),
    ({"model": {"hidden": 64, "layers": 0, "heads": 4, "intermediate": 128}}, "model.layers=0 is invalid"),
    ({"model": {"hidden": 10, "layers": 1, "heads": 4, "intermediate": 8}}, "model.hidden=10 must be a multiple"),
])
def test_bad_profile_values_name_the_field_and_the_valid_range(override, expected):
    with pytest.raises(ConfigError) as e:
        get_profile("smoke", **override)
    assert expected in str(e.value)


def test_valid_edge_values_are_accepted():
    p = get_profile("smoke", block_size=1, copy_steps=0, max_users=None, opd_tau=1.0, bench_taus=[1.0], ar_ema=0.999)
    assert p.block_size == 1 and p.copy_steps == 0 and p.bench_taus == (1.0,) and p.ar_ema == 0.999


def test_incomplete_model_dict_is_a_config_error_naming_what_is_missing():
    with pytest.raises(ConfigError) as e:
        get_profile("smoke", model={"hidden": 64, "layers": 2, "head": 4})
    msg = str(e.value)
    assert "profile field model" in msg and "missing heads" in msg and "missing intermediate" in msg
    assert "unknown head" in msg


def test_a_new_numeric_field_gets_a_default_range():
    """Fields added later need no entry in the table: a negative count or rate is still refused."""
    @dataclass(frozen=True)
    class Extended(Profile):
        train_speed_steps: int = 5
        train_speed_lr: float = 0.1

    smoke = {f.name: getattr(PROFILES["smoke"], f.name) for f in fields(Profile)}
    assert validate_profile(Extended(**smoke)).train_speed_steps == 5
    with pytest.raises(ConfigError, match=r"train_speed_steps=-1 is invalid: must be an integer >= 0"):
        validate_profile(Extended(**smoke, train_speed_steps=-1))
    with pytest.raises(ConfigError, match=r"train_speed_lr='fast' is invalid: must be a number >= 0"):
        validate_profile(Extended(**smoke, train_speed_lr="fast"))


def test_relabelled_shares_cannot_exceed_the_rows():
    assert get_profile("smoke", relabel_share=0.5, collide_share=0.5).collide_share == 0.5
    with pytest.raises(ConfigError, match="relabel_share=0.75 and collide_share=0.5"):
        get_profile("smoke", relabel_share=0.75, collide_share=0.5)


def test_unknown_sft_schedule_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError, match=r"ar_schedule='linear' is invalid: must be one of cosine, stable_decay"):
        get_profile("smoke", ar_schedule="linear")
    assert get_profile("smoke", ar_schedule="stable_decay").ar_schedule == "stable_decay"
    with pytest.raises(ConfigError, match=r"cft_schedule='linear' is invalid: must be one of cosine, stable_decay"):
        get_profile("smoke", cft_schedule="linear")


def test_effective_sub_block_is_the_profiles_unless_given_and_none_for_the_whole_block():
    from diffgr2_lite.decoders import effective_sub_block

    P = get_profile("smoke", sub_block=8)
    assert effective_sub_block(P, 32) == 8
    assert effective_sub_block(P, 32, 4) == 4
    assert effective_sub_block(P, 32, 0) is None           # 0: the whole block
    assert effective_sub_block(P, 8) is None               # a chunk as long as the block is the whole block
    assert effective_sub_block(P, 4) is None
    assert effective_sub_block(get_profile("smoke", sub_block=0), 32) is None
    with pytest.raises(ConfigError, match="sub_block"):
        validate_profile(get_profile("smoke", sub_block=-1))


def test_unknown_eval_engine_is_refused():
    with pytest.raises(ConfigError, match=r"eval_engine='fast' is invalid: must be one of readable, graphed"):
        get_profile("smoke", eval_engine="fast")
    assert get_profile("smoke", eval_engine="graphed").eval_engine == "graphed"


def test_unknown_cft_keep_is_refused():
    with pytest.raises(ConfigError, match=r"cft_keep='final' is invalid: must be one of best, last"):
        get_profile("smoke", cft_keep="final")
    assert get_profile("smoke", cft_keep="last").cft_keep == "last"
