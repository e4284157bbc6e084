"""vlp_jax/perf/trace_summary.py: per-op and per-kind step time from a profiler trace."""
import jax
import jax.numpy as jnp
import pytest

from vlp_jax.perf import trace_summary


def _op(pid, name, hlo_op, ts, dur):
  return {"ph": "X", "pid": pid, "tid": 1, "name": name, "ts": ts, "dur": dur,
          "args": {"hlo_op": hlo_op}}


def _events():
  """Two steps on a GPU timeline (pid 2), plus host launch events (pid 1)."""
  ev = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 5, "name": "thread_name",
         "args": {"name": "XLA Modules"}}]
  for step, t0 in enumerate((0.0, 1000.0)):
    ev.append({"ph": "X", "pid": 1, "tid": 9, "name": "train", "ts": t0, "dur": 1000.0,
               "args": {"step_num": str(step)}})
    ev.append(_op(1, "launch", "fusion.1", t0, 5.0))  # host side: must be ignored
    ev.append({"ph": "X", "pid": 2, "tid": 5, "name": "jit_train_step", "ts": t0 + 10,
               "dur": 740.0})  # a summary line over the ops below: must be ignored
    ev.append(_op(2, "nvjet_hsh_128x256_gemm", "custom-call.3", t0 + 10, 400.0))
    ev.append(_op(2, "cudnn_generated_sdpa_fwd", "custom-call.7", t0 + 410, 200.0))
    ev.append(_op(2, "loop_add_fusion", "fusion.1", t0 + 610, 100.0))
    ev.append(_op(2, "input_reduce_fusion", "fusion.2", t0 + 650, 100.0))  # overlaps
    ev.append({"ph": "X", "pid": 2, "tid": 1, "name": "Memcpy DtoD", "ts": t0 + 750,
               "dur": 50.0})  # a device event without an hlo_op: named by itself
  return ev


def test_device_timeline_per_step_figures():
  s = trace_summary.summarize(_events())
  assert s["steps"] == 2 and s["timeline"] == "device"
  assert s["step_wall_ms"] == pytest.approx(1.0)
  # Union of [10,410) [410,610) [610,710) [650,750) [750,800) = 790 us; op sum 850 us.
  assert s["busy_ms_per_step"] == pytest.approx(0.79)
  assert s["idle_fraction"] == pytest.approx(0.21)
  assert s["op_ms_per_step"] == pytest.approx(0.85)
  cats = {k: v["ms_per_step"] for k, v in s["categories"].items()}
  assert cats == pytest.approx({"matmul": 0.4, "attention": 0.2, "elementwise": 0.1,
                                "reduction": 0.1, "copy": 0.05})
  assert [o["hlo_op"] for o in s["ops"]][:2] == ["custom-call.3", "custom-call.7"]
  assert s["ops"][0]["count"] == 2 and s["ops"][0]["fraction"] == pytest.approx(400 / 850)
  assert s["ops"][-1]["hlo_op"] == "Memcpy DtoD"
  text = trace_summary.markdown(s, top=2)
  assert "| matmul | 0.400 | 47.1% |" in text and "fusion.2" not in text


def test_hlo_contents_decide_the_kind():
  # A fusion named like an elementwise one but holding a dot is a matmul.
  hlo = "\n".join([
      "%fused_computation.9 (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {",
      "  %p0 = f32[4,4]{1,0} parameter(0)",
      "  %p1 = f32[4,4]{1,0} parameter(1)",
      "  %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}",
      "  ROOT %tanh.2 = f32[4,4]{1,0} tanh(%dot.1)",
      "}",
      "ENTRY %main.5 (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {",
      "  %a = f32[4,4]{1,0} parameter(0)",
      "  %b = f32[4,4]{1,0} parameter(1)",
      "  ROOT %loop_fusion.3 = f32[4,4]{1,0} fusion(%a, %b), kind=kOutput, "
      "calls=%fused_computation.9",
      "}"])
  contents = trace_summary.hlo_op_contents(hlo)
  assert {"dot", "tanh", "fusion"} <= contents["loop_fusion.3"]
  events = [_op(0, "loop_fusion.3", "loop_fusion.3", 0.0, 10.0)]
  assert trace_summary.summarize(events)["ops"][0]["category"] == "elementwise"
  assert trace_summary.summarize(events, hlo)["ops"][0]["category"] == "matmul"


def test_real_compiled_hlo_is_parsed():
  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
  x = jnp.ones((64, 64))
  contents = trace_summary.hlo_op_contents(f.lower(x, x).compile().as_text())
  assert any("dot" in ops for ops in contents.values())
  assert any("reduce" in ops for ops in contents.values())


def test_missing_trace_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="profile_steps"):
    trace_summary.find_trace(str(tmp_path))
  with pytest.raises(ValueError, match="no XLA op events"):
    trace_summary.summarize([{"ph": "X", "pid": 0, "name": "x", "ts": 0, "dur": 1}])


def test_ops_are_split_by_part_of_the_step_from_their_op_names():
  p = "jit(train_step)/"
  assert trace_summary.part(
      p + "transpose(jvp(TwoTower))/TwoTower.embed_image/img/encoder/block_2/attn/x") == (
          "image attention", "bwd")
  assert trace_summary.part(
      p + "jvp(TwoTower)/TwoTower.embed_text/txt/encoder/block_0/mlp/tanh") == (
          "text MLP", "fwd")
  assert trace_summary.part(
      p + "jvp(TwoTower)/TwoTower.embed_text/txt/token_embedding/jit(_take)") == (
          "token embedding", "fwd")
  assert trace_summary.part(p + "jvp(TwoTower)/TwoTower.embed_image/img_proj/dot")[0] == (
      "loss and projections")
  assert trace_summary.part(p + "mul")[0].startswith("optimizer update")
  assert trace_summary.part("") == ("other", "")
  hlo = "\n".join([
      "ENTRY %main.5 (a: f32[4,4]) -> f32[4,4] {",
      "  %a = f32[4,4]{1,0} parameter(0)",
      '  ROOT %fusion.3 = f32[4,4]{1,0} fusion(%a), kind=kLoop, calls=%c, metadata={'
      'op_name="' + p + 'jvp(TwoTower)/TwoTower.embed_text/txt/encoder/block_0/mlp/x"}',
      "}"])
  assert trace_summary.hlo_op_names(hlo) == {
      "fusion.3": p + "jvp(TwoTower)/TwoTower.embed_text/txt/encoder/block_0/mlp/x"}
  s = trace_summary.summarize([_op(0, "fusion.3", "fusion.3", 0.0, 10.0)], hlo)
  assert s["parts"]["text MLP"]["fwd_ms_per_step"] == pytest.approx(0.01)
  assert "| text MLP | 0.010 | 100.0% | 0.010 | 0.000 |" in trace_summary.markdown(s)


def test_coca_op_names_are_split_by_module_path():
  # Op names as the pre-optimisation HLO of configs/coca_b16.py:runlocal's step has
  # them: CoCa's __call__ runs `encode_image` and `self.txt(...)` (no embed_* method).
  p = "jit(train_step)/"
  cases = {
      "transpose(jvp(CoCa))/CoCa.encode_image/img/encoder/block_1/attn/attn._fused_qkv":
          ("image attention", "bwd"),
      "jvp(CoCa)/CoCa.encode_image/img/encoder/block_0/mlp/fc1": ("image MLP", "fwd"),
      "transpose(jvp(CoCa))/txt/encoder/block_0/attn/attn._fused_qkv/reduce_sum":
          ("text attention", "bwd"),
      "jvp(CoCa)/txt/encoder/block_1/ln_mlp/mul": (
          "text rest (norms, embeddings, pooling)", "fwd"),
      "jvp(CoCa)/txt/token_embedding/jit(_take)": ("token embedding", "fwd"),
      "jvp(CoCa)/CoCa.multimodal/decoder/block_0/cross_attn/query": (
          "decoder cross-attention", "fwd"),
      "transpose(jvp(CoCa))/CoCa.multimodal/decoder/block_1/attn/out": (
          "decoder attention", "bwd"),
      "jvp(CoCa)/CoCa.multimodal/decoder/block_1/mlp/fc2": ("decoder MLP", "fwd"),
      "jvp(CoCa)/CoCa.encode_image/contrastive_pool/attn/key": (
          "image rest (norms, embeddings, pooling)", "fwd"),
      "jvp(CoCa)/CoCa.encode_image/img_proj/proj": ("loss and projections", "fwd"),
      "jvp(CoCa)/CoCa.multimodal/vocab_proj/dot_general": ("loss and projections", "fwd"),
      "jvp(jit(log_softmax))": ("loss and projections", "fwd"),
      # XLA joins merged ops' names with ';': the first decides.
      "jvp(CoCa)/txt/encoder/block_0/mlp/reshape;jit(train_step)/jvp(CoCa)/x": (
          "text MLP", "fwd"),
  }
  for name, want in cases.items():
    assert trace_summary.part(p + name) == want, name
  hlo = "\n".join([
      "ENTRY %main.5 (a: f32[4,4]) -> f32[4,4] {",
      "  %a = f32[4,4]{1,0} parameter(0)",
      '  %fusion.1 = f32[4,4]{1,0} fusion(%a), kind=kLoop, calls=%c, metadata={'
      'op_name="' + p + 'jvp(CoCa)/CoCa.multimodal/decoder/block_0/cross_attn/out"}',
      '  ROOT %fusion.2 = f32[4,4]{1,0} fusion(%fusion.1), kind=kLoop, calls=%c, '
      'metadata={op_name="' + p + 'transpose(jvp(CoCa))/txt/encoder/block_0/attn/x"}',
      "}"])
  s = trace_summary.summarize([_op(0, "fusion.1", "fusion.1", 0.0, 10.0),
                               _op(0, "fusion.2", "fusion.2", 10.0, 30.0)], hlo)
  assert s["parts"]["decoder cross-attention"]["fwd_ms_per_step"] == pytest.approx(0.01)
  assert s["parts"]["text attention"]["bwd_ms_per_step"] == pytest.approx(0.03)
