"""The text policies' rewards from graph runs are stored, and recompute to the stored values.

A ShapeWorld run (the uniform router, so groups mix direct, reflect and decompose; a noisy
reflector, so reflections are sometimes wrong or malformed) is scored by
``store_text_rewards``: R3's stage rewards per step, the analyzer's R_s per text and per
trajectory, R_o, R_f, SAIR's composite and its complexity penalty. Every stored row is then
recomputed here from the stored rows alone, with the formulas written out again (not the
storing code): V from the image scores the graph stored, or from the checker against a
decomposition step's expectation. The analyzer and the stage rewards are checked on hand-made
cases.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest
from PIL import Image

from agent_graph.presets import shapeworld_context, shapeworld_tasks
from agent_graph.rollout import rollout
from nodes.backends.base import ImageRequest, ScoredText
from nodes.backends.protocols import Analysis, Analyzer
from nodes.backends.shapeworld import ShapeWorldChecker, ShapeWorldConfig, parse_prompt
from nodes.backends.shapeworld.analyzer import ShapeWorldAnalyzer
from nodes.backends.shapeworld.decomposer import decompose
from nodes.backends.shapeworld.generator import ShapeWorldGenerator
from nodes.backends.shapeworld.planner import blueprint
from nodes.formats import SubTask, format_reflection, format_subtasks
from nodes.state import Budget
from storage.store import TrajectoryStore
from training.decisions.groups import read_groups
from training.result import TrainResult
from training.rewards import STEPWISE, store_stepwise_rewards, store_trained_rewards
from training.rewards.analyzer import VLMAnalyzer
from training.rewards.steps import ImageScores, MadeImage, TextOutput, TrajectoryTrace
from training.text.rewards import (
    COMPOSITE,
    NODE_REWARDS,
    PENALISED,
    REASON_IMAGE,
    REASON_TEXT,
    REFINEMENT,
    REFLECTION,
    node_reward,
    stage_rows,
    store_text_rewards,
)

WEIGHTS = (1.0, 0.5, 0.25)
EPS = 0.05
NOISY = ShapeWorldConfig(
    reflector_false_alarm_rate=0.3,
    reflector_off_rate=0.3,
    reflector_malformed_rate=0.2,
    reflector_miss_rate=0.1,
)


def _record(store, per_category=1, group_size=4):
    """A recorded ShapeWorld run of the uniform router with the noisy reflector: its id."""
    context = shapeworld_context("random", config=NOISY)
    tasks = shapeworld_tasks(per_category, group_size, seed=11)
    return asyncio.run(rollout(store, tasks, context=context, budget=Budget(max_rounds=3))).run_id


def _score(store, run, analyzer, weights=WEIGHTS, eps=EPS):
    judge = ShapeWorldChecker(NOISY)
    return asyncio.run(
        store_text_rewards(store, run, analyzer, judge=judge, weights=weights, complexity_eps=eps)
    )


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    store = TrajectoryStore(f"sqlite:///{tmp_path_factory.mktemp('text-rewards') / 'r.db'}")
    run = _record(store)
    analyzer = ShapeWorldAnalyzer(NOISY)
    yield store, run, analyzer, _score(store, run, analyzer)
    store.close()


# --- the independent recomputation ---------------------------------------------------------------


def _images(steps):
    """(ref, stored score, step seq, node, instruction) of every image, in state order."""
    return [
        (raw["ref"], raw["score"], step.seq, step.node, raw["instruction"])
        for step in steps
        for raw in step.update.get("images") or ()
    ]


def _v(store, checker, ref, score, text, prompt):
    """V of an image against ``text``: the stored score against the prompt, else the checker."""
    if text == prompt:
        return score
    return checker.judge_sync(store.get(ref), text).score


def _expected(store, detail, analyzer, checker):
    """Every reward of one trajectory, recomputed: {(step, name): value}."""
    steps = sorted(detail.steps, key=lambda s: s.seq)
    images = _images(steps)
    prompt = detail.prompt
    out = {}
    texts = []
    for index, step in enumerate(steps):
        if step.node == "plan":
            text = step.generations[0].text
            texts.append(analyzer.analyze_sync(prompt, "plan", text).score)
            out[(step.seq, STEPWISE)] = texts[-1]
            after = [i for i in images if i[2] > step.seq]
            v = after[0][1] if after else 0.0
            out[(step.seq, REASON_TEXT)] = v + (1.0 if text.strip() else 0.0)
            if after and after[0][3] == "draw":
                out[(after[0][2], REASON_IMAGE)] = v
        elif step.node == "decompose":
            text = step.generations[0].text
            texts.append(analyzer.analyze_sync(prompt, "decompose", text).score)
            out[(step.seq, STEPWISE)] = texts[-1]
        elif step.node == "reflect":
            r = step.update["reflections"][0]
            ref, score, *_ = images[r["image_index"]]
            image = store.get(ref)
            verdict = analyzer.analyze_sync(prompt, "reflect", r["text"], image, target=r["target"])
            texts.append(verdict.score)
            out[(step.seq, STEPWISE)] = texts[-1]
            v_prev = _v(store, checker, ref, score, r["target"], prompt)
            nxt = steps[index + 1] if index + 1 < len(steps) else None
            made = [i for i in images if nxt is not None and i[2] == nxt.seq]
            # the refine that carried out this reflection's edit: made from its instruction
            edit = None
            if made and made[0][3] == "refine" and made[0][4] == r["instruction"]:
                edit = made[0]
            if v_prev < 1:
                v_new = v_prev
                if edit is not None:
                    v_new = _v(store, checker, edit[0], edit[1], r["target"], prompt)
                c = v_new - v_prev
            else:
                c = 1.0 if r["stop_phrase"] else 0.0
            out[(step.seq, REFLECTION)] = c + (1.0 if r["well_formed"] else 0.0)
            if edit is not None:
                out[(edit[2], REFINEMENT)] = c
    r_s = sum(texts) / len(texts) if texts else 0.0
    out[(None, STEPWISE)] = r_s
    final = detail.final_state or {}
    r_o = detail.score if detail.score is not None else 0.0
    well = all(r["well_formed"] for r in final.get("reflections", ()))
    r_f = 1.0 if final and well and final.get("subtasks_well_formed") is not False else 0.0
    out[(None, "checker")], out[(None, "format")] = r_o, r_f
    out[(None, COMPOSITE)] = WEIGHTS[0] * r_o + WEIGHTS[1] * r_f + WEIGHTS[2] * r_s
    return out


def _penalised(rewards, images, eps):
    """SAIR's penalty as the paper states it: near-best members scaled by N* / N_i."""
    counts = [max(1, n) for n in images]
    near = [r >= max(rewards) - eps for r in rewards]
    fewest = min(n for n, is_near in zip(counts, near, strict=True) if is_near)
    return [r * fewest / n if m else r for r, n, m in zip(rewards, counts, near, strict=True)]


def test_every_stored_reward_recomputes_from_the_stored_rows(scored):
    store, run, analyzer, result = scored
    checker = ShapeWorldChecker(NOISY)
    summaries = store.trajectories(run=run, limit=None)
    finished = [s for s in summaries if s.status in ("succeeded", "failed")]
    assert finished and len(finished) == len(summaries)
    stored = {}
    for reward in store.rewards():
        key = (reward.trajectory_id, reward.step_seq, reward.name)
        assert key not in stored, f"{key} stored twice"
        stored[key] = reward.value
    expected = {}
    for summary in finished:
        detail = store.trajectory(summary.id)
        for (step, name), value in _expected(store, detail, analyzer, checker).items():
            expected[(summary.id, step, name)] = value
    groups = {}
    for summary in finished:
        composite = stored[(summary.id, None, COMPOSITE)]
        groups.setdefault(summary.group_id, []).append((summary, composite))
    for members in groups.values():
        values = _penalised([c for _, c in members], [s.image_count for s, _ in members], EPS)
        for (summary, _), value in zip(members, values, strict=True):
            expected[(summary.id, None, PENALISED)] = value
    assert set(stored) == set(expected) == set(result.values)
    for key, value in expected.items():
        assert stored[key] == pytest.approx(value, abs=1e-12), key
    # The run exercised what the rewards distinguish.
    names = Counter(name for _, _, name in stored)
    assert names[REFINEMENT] and names[REASON_IMAGE] and names[REFLECTION] > names[REFINEMENT]
    steps = [v for (_, step, name), v in stored.items() if name == STEPWISE and step is not None]
    assert 0.0 in steps and 1.0 in steps
    reflections = store.rewards(name=REFLECTION)
    for r in reflections:  # on a right image the analyzer wants exactly the stop phrase
        if r.details["v_prev"] == 1.0:
            wanted = 1.0 if r.details["stop_phrase"] else 0.0
            assert stored[(r.trajectory_id, r.step_seq, STEPWISE)] == wanted
    for r in store.rewards(name=REASON_TEXT):  # ShapeWorld's planner is always right
        assert stored[(r.trajectory_id, r.step_seq, STEPWISE)] == 1.0
    sources = Counter(r.details["v_prev_source"] for r in reflections)
    assert sources["stored"] and sources["judge:shapeworld-checker"]  # decompose steps' targets
    assert any(r.details["r_format"] == 0.0 for r in reflections)
    modes = Counter(s.mode for s in finished)
    assert modes["direct"] and modes["reflect"] and modes["decompose"]


def test_storing_twice_adds_no_rows(scored):
    store, run, analyzer, _ = scored
    rows = len(store.rewards())
    assert _score(store, run, analyzer).written == 0 and len(store.rewards()) == rows
    r_s = asyncio.run(store_stepwise_rewards(store, [run], analyzer))
    assert len(store.rewards()) == rows
    assert r_s == {t.id: t.rewards[STEPWISE] for t in store.trajectories(run=run, limit=None)}


def test_other_weights_store_a_new_latest_composite(tmp_path):
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'w.db'}")
    run = _record(store, group_size=2)
    analyzer = ShapeWorldAnalyzer(NOISY)
    _score(store, run, analyzer)
    before = {t.id: t.rewards for t in store.trajectories(run=run, limit=None)}
    again = _score(store, run, analyzer, weights=(1.0, 0.0, 0.0), eps=None)
    changed = [tid for tid, r in before.items() if r[COMPOSITE] != r["checker"]]
    assert changed and again.written == len(changed)  # only the composites that changed
    for t in store.trajectories(run=run, limit=None):
        assert t.rewards[COMPOSITE] == t.rewards["checker"]
        assert len(store.rewards(t.id, COMPOSITE)) == 1 + (t.id in changed)
    store.close()


def test_the_decision_trainer_trains_on_the_stored_r_s(scored):
    from training.decisions.trainer import GRPOConfig, composite_rewards

    store, run, _, _ = scored
    groups = read_groups(store, run, "mode", policy="uniform-mode", version="1")
    assert groups
    config = GRPOConfig(reward_weights=WEIGHTS)  # a3 > 0: R_s must be stored (it is)
    for group in groups:
        trained = composite_rewards(group, config)
        for member, value in zip(group.members, trained, strict=True):
            stored = store.trajectory(member.trajectory_id).rewards
            assert member.rewards[STEPWISE] == stored[STEPWISE]
            assert value == pytest.approx(stored[COMPOSITE], abs=1e-12)  # the same composite


def test_each_text_policy_has_its_reward(scored):
    store, *_ = scored
    assert {node: node_reward(node) for node in ("plan", "reflect", "decompose")} == NODE_REWARDS
    assert NODE_REWARDS == {"plan": REASON_TEXT, "reflect": REFLECTION, "decompose": PENALISED}
    assert node_reward("decompose", penalty=False) == COMPOSITE
    assert node_reward("plan", penalty=False) == REASON_TEXT
    with pytest.raises(ValueError, match="no text-policy reward"):
        node_reward("draw")
    for name in (REASON_TEXT, REFLECTION):  # per step, as read_node_groups prefers
        assert all(r.step_seq is not None for r in store.rewards(name=name))


# --- stage rewards on hand-worked trajectories ---------------------------------------------------


def _trace(images, texts, prompt="two red circles"):
    made = tuple(
        MadeImage(i, ref, node, instruction, score, seq, correction)
        for i, (ref, node, instruction, score, seq, correction) in enumerate(images)
    )
    return TrajectoryTrace("t", prompt, made, tuple(texts(made)))


def _stage(found):
    scores = ImageScores(images=None)  # every V is stored: no image is read
    scores.remember([found])
    return {(r.step, r.name): r.value for r in asyncio.run(stage_rows(found, scores))}


def _reflection(seq, image, text, stop, well_formed=True, edit=None):
    return TextOutput(seq, "reflect", text, image, "two red circles", stop, well_formed, edit)


def test_perfect_image_and_stop_phrase():
    found = _trace(
        [("a", "draw", "Blueprint: two red circles.", 1.0, 1, False)],
        lambda made: [
            TextOutput(0, "plan", "Blueprint: two red circles."),
            _reflection(2, 0, format_reflection("It matches.", None), stop=True),
        ],
    )
    # reason text V + r_format = 1 + 1; reason image V = 1; C = 1 (V̂ = 1, stop) + r_format 1
    assert _stage(found) == {(0, REASON_TEXT): 2.0, (1, REASON_IMAGE): 1.0, (2, REFLECTION): 2.0}


def test_an_edit_that_fixes_and_one_that_breaks():
    found = _trace(
        [
            ("a", "draw", "Blueprint: two red circles.", 0.5, 1, False),
            ("b", "refine", "Add a red circle.", 1.0, 3, True),
            ("c", "refine", "Add a red circle.", 0.5, 5, True),
        ],
        lambda made: [
            TextOutput(0, "plan", "Blueprint: two red circles."),
            _reflection(2, 0, format_reflection("Short.", "Add one."), False, True, made[1]),
            _reflection(4, 1, "Add a red circle.", False, False, made[2]),
            _reflection(6, 2, format_reflection("Fine.", None), stop=True),
        ],
    )
    assert _stage(found) == {
        (0, REASON_TEXT): 1.5,  # V = 0.5, well formed
        (1, REASON_IMAGE): 0.5,
        (2, REFLECTION): 1.5,  # C = 1.0 − 0.5, + r_format 1
        (3, REFINEMENT): 0.5,
        (4, REFLECTION): 0.0,  # V̂ = 1 and no stop phrase: C = 0; malformed: r_format 0
        (5, REFINEMENT): 0.0,
        (6, REFLECTION): 1.0,  # stop on V̂ = 0.5: C = V̂ − V̂ = 0; + r_format 1
    }


def test_a_plan_without_an_image_scores_its_format_only():
    found = _trace([], lambda made: [TextOutput(0, "plan", "   ")])
    assert _stage(found) == {(0, REASON_TEXT): 0.0}


def test_a_v_the_store_does_not_hold_needs_a_judge():
    found = _trace(
        [("a", "draw", "Draw two red circles.", 0.5, 1, False)],
        lambda made: [
            TextOutput(2, "reflect", "x", 0, "a red circle", True, True),
        ],
    )
    with pytest.raises(ValueError, match="pass a judge"):
        _stage(found)


# --- the analyzer on hand-made texts -------------------------------------------------------------

PROMPT = "two red circles above a blue square"


def _draw(text, seed=0):
    return ShapeWorldGenerator(ShapeWorldConfig.noiseless()).generate_sync(
        ImageRequest(prompt=text, seed=seed)
    )


def test_shapeworld_analyzer_is_an_analyzer():
    assert isinstance(ShapeWorldAnalyzer(), Analyzer)


def test_analyzer_scores_plans():
    analyzer = ShapeWorldAnalyzer()
    right = blueprint(parse_prompt(PROMPT))
    assert analyzer.analyze_sync(PROMPT, "plan", right).score == 1.0
    assert analyzer.analyze_sync(PROMPT, "plan", PROMPT).score == 1.0  # the prompt itself
    wrong = right.replace("two red circles", "three red circles")
    assert analyzer.analyze_sync(PROMPT, "plan", wrong).score == 0.0
    assert analyzer.analyze_sync(PROMPT, "plan", "Blueprint: a nice picture.").score == 0.0
    assert asyncio.run(analyzer.analyze(PROMPT, "plan", right)) == Analysis(
        1.0, "the blueprint describes the prompt's scene"
    )


def test_analyzer_scores_reflections_on_a_right_image():
    analyzer = ShapeWorldAnalyzer()
    image = _draw(PROMPT)
    assert ShapeWorldChecker().judge_sync(image, PROMPT).correct
    stop = format_reflection("It matches.", None)
    assert analyzer.analyze_sync(PROMPT, "reflect", stop, image).score == 1.0
    alarm = format_reflection("There should be more red circles.", "Add a red circle.")
    assert analyzer.analyze_sync(PROMPT, "reflect", alarm, image).score == 0.0


def test_analyzer_scores_reflections_on_a_wrong_image():
    analyzer = ShapeWorldAnalyzer()
    image = _draw("two red circles")  # the blue square is missing
    assert not ShapeWorldChecker().judge_sync(image, PROMPT).correct

    def score(instruction):
        text = format_reflection("The square is missing.", instruction)
        return analyzer.analyze_sync(PROMPT, "reflect", text, image).score

    assert score(None) == 0.0  # stop phrase on a wrong image: a miss
    assert score("Add a blue square below the red circles.") == 1.0  # the fix
    assert score("Add a blue square.") == 0.5  # not the fix (no place), but it helps
    assert score("Add a green square below the red circles.") == 0.0  # wrong colour
    assert score("Remove one red circle.") == 0.0  # fixes nothing real
    assert score("Paint it nicer.") == 0.0  # unreadable
    # the target it was checked against, not the prompt, decides (a decomposition's step)
    text = format_reflection("Two red circles.", None)
    on_step = analyzer.analyze_sync(PROMPT, "reflect", text, image, target="two red circles")
    assert on_step.score == 1.0
    with pytest.raises(ValueError, match="image"):
        analyzer.analyze_sync(PROMPT, "reflect", text)


def test_analyzer_scores_decompositions():
    analyzer = ShapeWorldAnalyzer()
    steps = decompose(parse_prompt(PROMPT))
    assert len(steps) == 2
    assert analyzer.analyze_sync(PROMPT, "decompose", format_subtasks(steps)).score == 1.0
    one_step = [SubTask(f"Draw {PROMPT}.", PROMPT)]
    assert analyzer.analyze_sync(PROMPT, "decompose", format_subtasks(one_step)).score == 1.0
    short = [steps[0]]  # ends before the prompt's scene
    assert analyzer.analyze_sync(PROMPT, "decompose", format_subtasks(short)).score == 0.0
    misplaced = [steps[0], SubTask("Add a blue square above the red circles.", steps[1].expect)]
    verdict = analyzer.analyze_sync(PROMPT, "decompose", format_subtasks(misplaced))
    assert verdict.score == 0.5 and verdict.parts == (1.0, 0.0)
    assert analyzer.analyze_sync(PROMPT, "decompose", "not json").score == 0.0


# --- a judge-based analyzer for real servers -----------------------------------------------------


class FakeScorer:
    """A scoring chat model: log P(Yes) = −0.1, log P(No) = −2.4, whatever it is asked."""

    model_id = "fake-vlm"

    def __init__(self):
        self.asked = []

    async def chat(self, request):  # pragma: no cover - never called
        raise NotImplementedError

    async def score_text(self, messages, text, image=None):
        self.asked.append(messages)
        return ScoredText((1,), (-0.1,) if text == "Yes" else (-2.4,), self.model_id)


def test_vlm_analyzer_is_the_yes_probability_of_its_question():
    model = FakeScorer()
    analyzer = VLMAnalyzer(model)
    image = Image.new("RGB", (8, 8))
    verdict = asyncio.run(analyzer.analyze("p", "reflect", "<think>x</think>Add a dog.", image))
    assert verdict.score == pytest.approx(1 / (1 + math.exp(-2.4 + 0.1)), abs=1e-12)
    assert isinstance(analyzer, Analyzer) and analyzer.model_id == "vlm-analyzer:fake-vlm"
    (system, user), _ = model.asked
    assert user.images == (image,) and "Add a dog." in user.text and system.role == "system"
    asyncio.run(analyzer.analyze("p", "plan", "Blueprint: p."))
    assert model.asked[-1][1].images == ()
    with pytest.raises(ValueError, match="no analyzer question"):
        asyncio.run(analyzer.analyze("p", "draw", "x"))


# --- what a LoRA trainer trained each member with ------------------------------------------------


def test_store_trained_rewards_for_a_lora_kind(tmp_path):
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'l.db'}")
    run = _record(store, group_size=1)
    (first, second) = store.trajectories(run=run, limit=2)
    result = TrainResult(
        "4",
        member_rewards={
            first.id: ("g1", {"reward": 1.5, "advantage": 0.7}),
            second.id: ("g1", {"reward": 0.5, "advantage": -0.7}),
        },
    )
    written = store_trained_rewards(
        store,
        result,
        "plan-lora",
        {"runs": [run]},
        source="training.text.trainer",
        prefix="lora_",
        steps={first.id: 0},
    )
    assert written == 4
    rows = {(r.trajectory_id, r.name): r for r in store.rewards() if r.name.startswith("lora_")}
    assert rows[(first.id, "lora_advantage")].value == 0.7
    assert rows[(first.id, "lora_advantage")].step_seq == 0
    assert rows[(second.id, "lora_reward")].step_seq is None  # no step given: the trajectory's
    assert rows[(second.id, "lora_reward")].details == {
        "trained": "plan-lora@4",
        "group": "g1",
        "runs": [run],
    }
    assert rows[(second.id, "lora_reward")].source == "training.text.trainer"
    store.close()


def test_stepwise_mean_of_no_text_is_zero():
    from training.rewards.stepwise import stepwise_rows

    found = TrajectoryTrace("t", "p", (), ())
    rows, r_s = stepwise_rows(found, {}, "a")
    assert r_s == 0.0 and [(r.step, r.value) for r in rows] == [(None, 0.0)]


def test_an_unreadable_target_scores_zero_not_a_crash():
    """A learned decomposer can write a sub-task target no judge can read ("an orangeag"):
    the reflection on it scores V = 0, with the reason in its source, and scoring goes on."""
    from nodes.backends.shapeworld import ShapeWorldChecker
    from storage.images import MemoryImageStore
    from training.rewards.steps import ImageScores

    images = MemoryImageStore()
    ref = images.put(Image.new("RGB", (64, 64), "white"))
    scores = ImageScores(images, ShapeWorldChecker())
    value, source = asyncio.run(scores.score(ref, "an orangeag"))
    assert value == 0.0 and source == "judge:shapeworld-checker:unreadable"
    value, source = asyncio.run(scores.score(ref, "a red circle"))  # readable: judged
    assert value == 0.0 and source == "judge:shapeworld-checker"
