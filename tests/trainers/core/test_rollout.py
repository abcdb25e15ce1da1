"""Rollout planners: registry, uniform, XRPO's allocator and seeding.

Worked numbers and invariants: ``docs/algorithms/xrpo.md``.
"""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from trainers.contract.methods.grpo import PLANNER_NAMES as ROLLOUT_PLANNERS
from trainers.core.retrieval import LexicalIndex
from trainers.core.rollout import (
    PLANNERS,
    Allocation,
    UniformPlanner,
    XrpoPlanner,
    format_seeded_prompt,
    get_planner,
    xrpo_priority,
)
from trainers.core.tdist import student_t_quantile

EX3 = {"a": [1, 0, 0, 0], "b": [1, 1, 0, 0], "c": [1, 1, 1, 1]}


def planner_at_step(step: int, history: dict[str, list[float]], **hp) -> XrpoPlanner:
    """An xrpo planner that has made ``step`` plans and seen ``history`` (key -> rewards)."""
    planner = XrpoPlanner(**hp)
    planner.load_state_dict({"step": step, "prompts": {}, "corpus": []})
    for key, rewards in history.items():
        planner.observe(key, f"question {key}", rewards, ["..."] * len(rewards))
    return planner


# ----------------------------------------------------------------- registry, uniform
def test_registry_keys_are_the_method_names():
    assert tuple(PLANNERS) == ROLLOUT_PLANNERS
    assert get_planner("xrpo") is XrpoPlanner and get_planner("uniform") is UniformPlanner


def test_unknown_planner_lists_the_valid_names():
    with pytest.raises(KeyError, match="uniform, xrpo"):
        get_planner("nope")


def test_uniform_gives_every_prompt_budget_over_n_without_context():
    planner = UniformPlanner()
    assert planner.plan(["a", "b", "c"], 12) == [Allocation(4)] * 3
    assert planner.metrics()["rollout/n_mean"] == 4.0
    assert planner.state_dict() == {}
    with pytest.raises(ValueError, match="multiple"):
        planner.plan(["a", "b", "c"], 10)


# ----------------------------------------------------------------- t quantile, priority
@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 3, 3.1824),  # xrpo.md Ex 3b
        (0.975, 4, 2.7764),  # xrpo.md Ex 3b
        (0.975, 1, 12.7062),
        (0.975, 2, 4.3027),
        (0.975, 10, 2.2281),
        (0.975, 30, 2.0423),
        (0.975, 1000, 1.9623),
        (0.995, 1, 63.6567),
        (0.95, 5, 2.0150),
        (0.05, 5, -2.0150),
        (0.5, 7, 0.0),
    ],
)
def test_t_quantile_matches_tables(p, df, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("rewards", "delta", "phi", "pi"),
    [
        # s = 0.5: h(4) = 3.1824·0.5/2 = 0.7956, h(5) = 2.7764·0.5/√5 = 0.6208, Δ̂ = 0.1748;
        # φ = 0.1·sqrt(ln 101 / 4) = 0.1074.
        ([1, 0, 0, 0], 0.1748, 0.1074, 0.2822),
        ([1, 1, 0, 0], 0.2018, 0.1074, 0.3092),
        ([1, 1, 1, 1], 0.0, 0.1074, 0.1074),
    ],
)
def test_priority_reproduces_spec_example_3(rewards, delta, phi, pi):
    got = xrpo_priority(statistics.stdev(rewards), 4, 100, alpha=0.05, lam=0.1)
    assert got == pytest.approx((delta, phi, pi), abs=1e-4)
    # The planner's own statistics (Welford over observed rewards) give the same Π.
    assert planner_at_step(100, {"q": rewards}).priority("q", 0) == pytest.approx(pi, abs=1e-4)


def test_priority_invariants():
    delta, phi, pi = xrpo_priority(0.0, 6, 10)
    assert delta == 0.0 and pi == phi  # s = 0: Π = φ
    assert xrpo_priority(0.3, 6, 10)[0] > 0  # s > 0: Δ̂ > 0
    assert xrpo_priority(0.3, 6, 10, lam=0.0)[1] == 0.0
    no_sqrt = xrpo_priority(0.3, 6, 10, sqrt_bonus=False)[1]
    assert no_sqrt == pytest.approx(0.1 * math.log(11) / 6)


# ----------------------------------------------------------------- allocation
def test_first_visit_is_phase_one_n0_each_remainder_to_the_first():
    planner = XrpoPlanner()
    assert [a.n for a in planner.plan(list("abcd"), 16)] == [4, 4, 4, 4]
    assert [a.n for a in XrpoPlanner().plan(list("abcd"), 18)] == [5, 5, 4, 4]
    assert [a.n for a in XrpoPlanner(n0=3).plan(list("abcd"), 16)] == [4, 4, 4, 4]
    assert planner.metrics()["rollout/new_prompts"] == 4.0


def test_revisit_hands_rollouts_to_argmax_priority():
    # Ex 3 prompts at T = 100, each holding 4 rewards; budget 12, n_min 2 -> 6 extra.
    # Π at n = 4 + count:  count  2      3      4      5      6
    #   a [1,0,0,0]              .1499  .1255  .1095  .0982  .0896
    #   b [1,1,0,0]              .1595  .1324  .1148  .1023  .0930
    #   c [1,1,1,1]              .0876  .0811  ...
    # Order taken: b, a, b, a, b, a -> a 5, b 5, c 2.
    planner = planner_at_step(99, EX3)  # the plan below is step 100
    assert [a.n for a in planner.plan(["a", "b", "c"], 12)] == [5, 5, 2]
    assert planner.metrics()["rollout/step"] == 100.0


def reference_allocation(history, keys, budget, step, n_min=2, n_max=32):
    """Loop version: recompute every Π after each rollout and take the first argmax."""
    counts = [n_min] * len(keys)
    for _ in range(budget - sum(counts)):
        best, best_i = -1.0, -1
        for i, key in enumerate(keys):
            rewards = history[key]
            std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
            pi = xrpo_priority(std, len(rewards) + counts[i], step)[2]
            if counts[i] < n_max and pi > best + 1e-12:
                best, best_i = pi, i
        counts[best_i] += 1
    return counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heap_allocation_matches_the_loop_reference(seed):
    rng = random.Random(seed)
    keys = [f"p{i}" for i in range(12)]
    history = {k: [rng.choice([0.0, 1.0, 0.5]) for _ in range(rng.randint(2, 20))] for k in keys}
    planner = planner_at_step(rng.randint(0, 50), history, n_max=12)
    step = planner.state_dict()["step"] + 1
    budget = 96
    got = [a.n for a in planner.plan(keys, budget)]
    assert sum(got) == budget and min(got) >= 2 and max(got) <= 12
    assert got == reference_allocation(history, keys, budget, step, n_max=12)


def test_new_prompts_keep_n0_and_revisited_share_the_rest():
    planner = planner_at_step(5, {"a": [1, 0, 0, 0], "b": [1, 1, 1, 1]})
    got = [a.n for a in planner.plan(["a", "new", "b"], 12)]
    assert got[1] == 4 and sum(got) == 12 and got[0] > got[2] >= 2


def test_leftover_goes_to_new_prompts_when_revisited_ones_are_full():
    planner = planner_at_step(5, {"a": [1, 0]}, n_max=4)
    # n0 = 10 // 3 = 3, floors [2, 3, 3]: the 2 extra go to "a", which is then full.
    assert [a.n for a in planner.plan(["a", "x", "y"], 10)] == [4, 3, 3]
    planner = planner_at_step(5, {"a": [1, 0]}, n_max=4)
    # n0 = 11 // 3 = 3: "a" fills to 4 and the third extra goes to the first new prompt.
    assert [a.n for a in planner.plan(["a", "x", "y"], 11)] == [4, 4, 3]


def test_impossible_budgets_are_refused_with_a_fix():
    with pytest.raises(ValueError, match="n_min"):
        XrpoPlanner().plan(["a", "b"], 3)  # budget // N = 1 < n_min
    with pytest.raises(ValueError, match="n_max"):
        XrpoPlanner(n_max=4).plan(["a", "b"], 10)
    planner = planner_at_step(0, {"a": [1, 0]}, n0=8)
    with pytest.raises(ValueError, match="n0"):
        planner.plan(["a", "b"], 9)
    assert planner.state_dict()["step"] == 0  # a refused plan changes nothing
    with pytest.raises(ValueError):
        XrpoPlanner(n_min=3, n0=2)


def test_non_finite_rewards_are_ignored():
    planner = planner_at_step(0, {"a": [1.0, float("nan"), 0.0]})
    assert planner.state_dict()["prompts"]["a"][0] == 2
    planner.observe("b", "q", [float("nan")], ["x"])
    assert "b" not in planner.state_dict()["prompts"]


# ----------------------------------------------------------------- seeding
def seeded_planner(**hp) -> XrpoPlanner:
    planner = XrpoPlanner(**hp)
    planner.plan(["add", "mul", "geo", "hard"], 8)
    planner.observe("add", "What is 2 + 3?", [1, 1], ["2 + 3 = 5", "It is five: 5"])
    planner.observe("mul", "What is 4 * 6?", [0, 1], ["10", "4 * 6 = 24"])
    planner.observe("geo", "Area of a circle of radius 2?", [1, 0], ["4 pi", "2 pi"])
    planner.observe("hard", "What is 7 + 8?", [0, 0], ["14", "16"])
    return planner


def test_unsolved_prompt_gets_the_two_most_similar_solutions():
    planner = seeded_planner()
    allocs = planner.plan(["hard", "add"], 4)
    # "What is 7 + 8?" shares "what is", "is", "+", "?" with the addition question,
    # fewer terms with the multiplication one, almost none with the circle one.
    assert allocs[0].exemplars == [
        ("What is 2 + 3?", "2 + 3 = 5"),  # the shorter of add's two correct answers
        ("What is 4 * 6?", "4 * 6 = 24"),
    ]
    assert allocs[1].exemplars == []  # solved prompts are never seeded
    assert planner.metrics()["rollout/seeded_prompts"] == 1.0
    assert planner.metrics()["rollout/corpus_size"] == 3.0


def test_seeding_needs_every_reward_so_far_at_or_below_the_threshold():
    planner = seeded_planner()
    planner.observe("hard", "What is 7 + 8?", [0, 1], ["15", "15"])  # now solved
    assert planner.plan(["hard"], 2)[0].exemplars == []
    graded = seeded_planner(correct_threshold=0.5)
    graded.observe("part", "What is 9 + 9?", [0.5, 0.2], ["18?", "17"])
    assert len(graded.plan(["part"], 2)[0].exemplars) == 2
    assert all(k != "part" for k, *_ in graded.state_dict()["corpus"])


def test_no_exemplar_from_the_prompt_itself_or_the_same_question():
    planner = seeded_planner(num_exemplars=5)
    planner.observe("dup", "What  is 7 + 8?", [1], ["15"])  # same question, other key
    questions = [q for q, _ in planner.plan(["hard"], 2)[0].exemplars]
    assert "What  is 7 + 8?" not in questions and len(questions) == 3


def test_ties_and_unrelated_questions_take_the_most_recent_solutions():
    planner = seeded_planner()
    planner.observe("add2", "What is 2 + 3?", [1], ["5"])  # same score as "add", newer
    planner.observe("odd", "zzz", [0], ["?"])  # shares no term with any question
    assert [s for _, s in planner.plan(["hard"], 2)[0].exemplars] == ["5", "2 + 3 = 5"]
    # No similarity anywhere: the two newest entries (add2, then geo).
    assert [q for q, _ in planner.plan(["odd"], 2)[0].exemplars] == [
        "What is 2 + 3?",
        "Area of a circle of radius 2?",
    ]


def test_shortest_correct_solution_is_kept_and_truncated():
    planner = seeded_planner(max_exemplar_chars=6)
    planner.observe("add", "What is 2 + 3?", [1], ["5"])
    corpus = {k: s for k, _, s in planner.state_dict()["corpus"]}
    assert corpus["add"] == "5"
    assert corpus["mul"] == "4 * 6 …"  # cut to 6 characters, marked


def test_seeding_off_and_empty_corpus_give_no_exemplars():
    assert seeded_planner(num_exemplars=0).plan(["hard"], 2)[0].exemplars == []
    planner = XrpoPlanner()
    planner.observe("hard", "What is 7 + 8?", [0, 0], ["14", "16"])
    assert planner.plan(["hard"], 2)[0].exemplars == []


def test_corpus_is_capped_oldest_first():
    planner = seeded_planner(max_corpus=2)
    assert [k for k, *_ in planner.state_dict()["corpus"]] == ["mul", "geo"]


def test_state_round_trips_through_json_and_plans_the_same():
    planner = seeded_planner()
    restored = XrpoPlanner()
    restored.load_state_dict(json.loads(json.dumps(planner.state_dict())))
    keys = ["hard", "add", "mul", "geo", "new"]
    assert restored.plan(keys, 15) == planner.plan(keys, 15)
    assert restored.metrics() == planner.metrics()


def test_lexical_similarity_is_tfidf_cosine():
    index = LexicalIndex()
    index.add("x", "the quick brown fox")
    index.add("y", "integrate x squared")
    scores = index.scores("the quick brown fox")
    assert scores["x"] == pytest.approx(1.0) and "y" not in scores
    index.remove("x")
    assert index.scores("the quick brown fox") == {}


# ----------------------------------------------------------------- prompt formatting
EXEMPLARS = [("What is 2 + 3?", "5"), ("What is 4 * 6?", "24")]


def test_format_string_prompt_prefixes_a_block():
    assert format_seeded_prompt("What is 7 + 8?", EXEMPLARS) == (
        "Example 1:\nProblem: What is 2 + 3?\nSolution: 5\n\n"
        "Example 2:\nProblem: What is 4 * 6?\nSolution: 24\n\n"
        "What is 7 + 8?"
    )
    assert format_seeded_prompt("same", []) == "same"


def test_format_chat_prompt_adds_turns_after_the_system_message():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7 + 8?"}]
    out = format_seeded_prompt(prompt, EXEMPLARS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert out[1:3] == [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    assert out[-1] == prompt[-1] and len(prompt) == 2  # input untouched
    parts = [{"role": "user", "content": [{"type": "text", "text": "7 + 8?"}]}]
    assert format_seeded_prompt(parts, EXEMPLARS[:1])[1]["content"] == [
        {"type": "text", "text": "5"}
    ]
