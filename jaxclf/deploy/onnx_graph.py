"""A JAX function of one batch of images as an ONNX graph, written with the `onnx` package's helpers.

`to_onnx(fn, (H, W, 3), np.uint8)` traces `fn` (weights closed over) to a jaxpr and writes one
ONNX node (or a few) per JAX primitive, opset 18, with a dynamic batch dimension "B". The batch
size is found, not assumed: the function is traced at two batch sizes and a dimension that differs
between the traces is a multiple of the batch (reshapes, broadcasts and slices follow it at run
time). Whatever depends only on the weights (BiT's weight standardisation, kernel layouts,
BatchNorm statistics) is computed once here and stored as constants. Convolutions and pooling
are NCHW in ONNX: each is wrapped in transposes, which onnxruntime's optimizer cancels between
layers. A primitive without a translation below is an ExportError naming it.

Why not jax2onnx: see README, "Deploying" (0.13 and 0.17 both fail on jaxclf's ResNets).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jaxclf.deploy import jaxprs

OPSET = 18
# The two batch sizes traced: primes, so that a dimension that is a multiple of the batch cannot be
# mistaken for a model dimension by coincidence.
_TRACE_BATCHES = (9973, 9967)
_INT64_MAX = np.iinfo(np.int64).max


class UnsupportedError(ValueError):
    """The function uses a primitive (or a form of one) that has no ONNX translation here; the message names it."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """A dimension of `k` times the batch size."""

    k: int


@dataclasses.dataclass
class _Value:
    """A JAX value in the graph being built: an ONNX tensor name or a constant, with its JAX shape
    (ints and `Batch`es). `full` is False where the tensor is only broadcastable to that shape
    (broadcasts stay implicit until an op needs the real shape)."""

    shape: tuple
    dtype: np.dtype
    name: str | None = None
    const: np.ndarray | None = None
    full: bool = True


_ELEMENTWISE_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
                       "pow": "Pow", "gt": "Greater", "lt": "Less", "ge": "GreaterOrEqual", "le": "LessOrEqual",
                       "eq": "Equal", "and": "And", "or": "Or", "rem": "Mod"}
_ELEMENTWISE_UNARY = {"exp": "Exp", "log": "Log", "tanh": "Tanh", "erf": "Erf", "sqrt": "Sqrt", "neg": "Neg",
                      "abs": "Abs", "logistic": "Sigmoid", "sign": "Sign", "floor": "Floor", "ceil": "Ceil",
                      "not": "Not", "stop_gradient": "Identity", "copy": "Identity", "copy_p": "Identity",
                      "sin": "Sin", "cos": "Cos"}
_ELEMENTWISE_OTHER = ("ne", "rsqrt", "square", "integer_pow", "convert_element_type", "select_n", "clamp")
_ELEMENTWISE = set(_ELEMENTWISE_BINARY) | set(_ELEMENTWISE_UNARY) | set(_ELEMENTWISE_OTHER)
_REDUCTIONS = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin",
               "reduce_prod": "ReduceProd"}
# Constant folding in numpy of the float ops weight preprocessing uses (BiT's standardisation, layouts).
_NUMPY_FOLDS = {
    "add": lambda x, y, **_: x + y, "sub": lambda x, y, **_: x - y, "mul": lambda x, y, **_: x * y,
    "div": lambda x, y, **_: x / y, "max": lambda x, y, **_: np.maximum(x, y),
    "min": lambda x, y, **_: np.minimum(x, y), "neg": lambda x, **_: -x, "sqrt": lambda x, **_: np.sqrt(x),
    "rsqrt": lambda x, **_: 1 / np.sqrt(x), "square": lambda x, **_: x * x, "integer_pow": lambda x, y, **_: x**y,
    "exp": lambda x, **_: np.exp(x), "tanh": lambda x, **_: np.tanh(x),
    "convert_element_type": lambda x, new_dtype, **_: x.astype(new_dtype),
    "reduce_sum": lambda x, axes, **_: np.sum(x, axis=tuple(axes)),
    "reduce_max": lambda x, axes, **_: np.max(x, axis=tuple(axes)),
    "transpose": lambda x, permutation, **_: np.transpose(x, permutation),
    "reshape": lambda x, new_sizes, **_: np.reshape(x, new_sizes),
    "squeeze": lambda x, dimensions, **_: np.squeeze(x, tuple(dimensions)),
    "stop_gradient": lambda x, **_: x, "gt": lambda x, y, **_: x > y, "lt": lambda x, y, **_: x < y,
    "ge": lambda x, y, **_: x >= y, "le": lambda x, y, **_: x <= y, "eq": lambda x, y, **_: x == y,
    "select_n": lambda which, *cases, **_: np.choose(which.astype(np.int32), cases),
}


def to_onnx(fn: Callable[[jax.Array], jax.Array], example_shape: Sequence[int], dtype, *, input_name: str = "images",
            output_name: str = "logits", model_name: str = "jaxclf") -> onnx.ModelProto:
    """`fn(x[B, *example_shape] of dtype) -> y[B, ...]` as a checked ONNX model with symbolic batch "B"."""
    example_shape = tuple(int(d) for d in example_shape)
    traces = [jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((b, *example_shape), dtype)) for b in _TRACE_BATCHES]
    graph = _Graph(input_name, np.dtype(dtype), example_shape)
    consts = [_constant(np.asarray(c)) for c in traces[0].consts]
    (out,) = graph.translate(traces[0].jaxpr, traces[1].jaxpr, consts, [graph.input])
    graph.nodes.append(helper.make_node("Identity", [graph.full(out)], [output_name]))
    output = helper.make_tensor_value_info(output_name, helper.np_dtype_to_tensor_dtype(out.dtype),
                                           [_dim_param(d) for d in out.shape])
    inputs = [helper.make_tensor_value_info(input_name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                            ["B", *example_shape])]
    model = helper.make_model(helper.make_graph(graph.nodes, model_name, inputs, [output], graph.initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="jaxclf")
    onnx.checker.check_model(model)
    return model


def _dim_param(d) -> int | str:
    return d if isinstance(d, int) else ("B" if d.k == 1 else f"{d.k}*B")


def _constant(array: np.ndarray, shape: tuple | None = None) -> _Value:
    array = np.asarray(array)
    shape = tuple(array.shape) if shape is None else tuple(shape)
    return _Value(shape, array.dtype, const=array, full=tuple(array.shape) == shape)


def _without_leading_ones(array: np.ndarray) -> np.ndarray:
    """A constant operand of a broadcasting op without its leading 1-dims (ONNX aligns ranks on the right):
    a bias is then the 1-D tensor that onnxruntime's fusions and quantizer look for."""
    while array.ndim and array.shape[0] == 1:
        array = array[0]
    return array


def _is_static(shape: tuple) -> bool:
    return all(isinstance(d, int) for d in shape)


def _merged_shape(a: tuple, b: tuple) -> tuple:
    """The symbolic shape of a value seen with shape `a` in the first trace and `b` in the second."""
    out = []
    for x, y in zip(a, b):
        if x == y:
            out.append(int(x))
            continue
        (b1, b2) = _TRACE_BATCHES
        if x % b1 or y % b2 or x // b1 != y // b2:
            raise UnsupportedError(f"a dimension of {x} at batch {b1} and {y} at batch {b2} is not a multiple of the "
                                   "batch size")
        out.append(Batch(x // b1))
    return tuple(out)


class _Graph:
    """The ONNX nodes and initializers written so far, and the translation of one primitive at a time."""

    def __init__(self, input_name: str, dtype: np.dtype, example_shape: tuple):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self.input = _Value((Batch(1), *example_shape), dtype, name=input_name)
        self._batch_name: str | None = None

    # --- building blocks ---------------------------------------------------------------------

    def _fresh(self, hint: str = "v") -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def node(self, op: str, inputs: Sequence[str], num_outputs: int = 1, **attrs) -> str | list[str]:
        outputs = [self._fresh(op.lower()) for _ in range(num_outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, **attrs))
        return outputs[0] if num_outputs == 1 else outputs

    def initializer(self, array: np.ndarray) -> str:
        name = self._fresh("const")
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.initializer(np.asarray(values, np.int64))

    def tensor(self, value: _Value) -> str:
        """The ONNX name of `value` as it is (possibly only broadcastable to its shape)."""
        if value.name is None:
            value.name = self.initializer(value.const)
        return value.name

    def full(self, value: _Value) -> str:
        """The ONNX name of `value` with its full shape (an implicit broadcast made explicit)."""
        if value.full:
            return self.tensor(value)
        if value.const is not None and _is_static(value.shape):
            return self.initializer(np.broadcast_to(value.const, value.shape))
        return self.node("Expand", [self.tensor(value), self.shape_tensor(value.shape)])

    def shape_tensor(self, shape: tuple, batch_as_minus_one: bool = False) -> str:
        """An int64 tensor holding `shape`, its batch dimensions computed at run time (or -1 for the one there is)."""
        if _is_static(shape):
            return self.ints(shape)
        if batch_as_minus_one and sum(not isinstance(d, int) for d in shape) == 1:
            return self.ints([d if isinstance(d, int) else -1 for d in shape])
        pieces = []
        for d in shape:
            if isinstance(d, int):
                pieces.append(self.ints([d]))
            else:
                pieces.append(self.batch() if d.k == 1 else self.node("Mul", [self.batch(), self.ints([d.k])]))
        return self.node("Concat", pieces, axis=0)

    def batch(self) -> str:
        """The run-time batch size as an int64 tensor of shape [1]."""
        if self._batch_name is None:
            shape = self.node("Shape", [self.input.name])
            self._batch_name = self.node("Slice", [shape, self.ints([0]), self.ints([1])])
        return self._batch_name

    # --- translation -------------------------------------------------------------------------

    def translate(self, jaxpr, jaxpr2, consts: Sequence[_Value], args: Sequence[_Value]) -> list[_Value]:
        """The outputs of `jaxpr` given its constants and arguments; `jaxpr2` is the same program traced at
        the other batch size, read only for the shapes."""
        env = {}
        for var, value in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args]):
            env[var] = value

        def read(atom):
            if isinstance(atom, jax.extend.core.Literal):
                return _constant(np.asarray(atom.val, atom.aval.dtype))
            return env[atom]

        if len(jaxpr.eqns) != len(jaxpr2.eqns):
            raise UnsupportedError("the function computes a different program at different batch sizes")
        for eqn, eqn2 in zip(jaxpr.eqns, jaxpr2.eqns):
            if eqn.primitive is not eqn2.primitive:
                raise UnsupportedError("the function computes a different program at different batch sizes")
            ins = [read(v) for v in eqn.invars]
            shapes = [_merged_shape(a.aval.shape, b.aval.shape) for a, b in zip(eqn.outvars, eqn2.outvars)]
            outs = self.equation(eqn, eqn2, ins, shapes)
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, eqn2, ins: list[_Value], shapes: list[tuple]) -> list[_Value]:
        """The values of one equation's outputs: a nested program translated, constants folded, or ONNX nodes."""
        name = eqn.primitive.name
        inner = jaxprs.inner_jaxpr(eqn.params)
        if inner is not None:
            jaxpr, consts = inner
            jaxpr2, _ = jaxprs.inner_jaxpr(eqn2.params)
            return self.translate(jaxpr, jaxpr2, [_constant(np.asarray(c)) for c in consts], ins)
        dtypes = [np.dtype(v.aval.dtype) for v in eqn.outvars]
        constant = all(v.const is not None for v in ins)
        if constant and name != "broadcast_in_dim" and (name in _ELEMENTWISE or all(map(_is_static, shapes))):
            return self.fold(eqn, ins, shapes)
        if name in _REDUCTIONS:
            return [_Value(shapes[0], dtypes[0], name=self._reduce(_REDUCTIONS[name], ins, eqn.params["axes"]))]
        if name in _ELEMENTWISE:
            out, full = self.elementwise(name, eqn.params, ins, dtypes[0], shapes[0])
            return [_Value(shapes[0], dtypes[0], name=out, full=full)]
        # (translations are named _op_<primitive>, so that no helper method can be taken for one)
        translate = getattr(self, f"_op_{name}", None)
        if translate is None:
            raise UnsupportedError(f"JAX primitive {name!r} has no ONNX translation (inputs "
                                   f"{[v.shape for v in ins]}, params {sorted(eqn.params)})")
        outs = translate(ins, shapes, dtypes, **eqn.params)
        outs = outs if isinstance(outs, list) else [outs]
        return [value if isinstance(value, _Value) else _Value(shape, dtype, name=value)
                for value, shape, dtype in zip(outs, shapes, dtypes)]

    def fold(self, eqn, ins: list[_Value], shapes: list[tuple]) -> list[_Value]:
        """Compute an equation of constants now: with numpy where it computes the same in float32, else
        with JAX (each JAX call compiles, which costs seconds over a whole model)."""
        name = eqn.primitive.name
        if name in _ELEMENTWISE:
            arrays = np.broadcast_arrays(*[v.const for v in ins]) if len(ins) > 1 else [ins[0].const]
        else:
            arrays = [np.broadcast_to(v.const, v.shape) for v in ins]
        folded = _NUMPY_FOLDS.get(name)
        # (integer division truncates in JAX, not in numpy)
        if folded is not None and (name != "div" or all(np.issubdtype(a.dtype, np.floating) for a in arrays)):
            results = [np.asarray(folded(*arrays, **eqn.params), np.dtype(eqn.outvars[0].aval.dtype))]
        else:
            results = eqn.primitive.bind(*[jnp.asarray(a) for a in arrays], **eqn.params)
            results = results if eqn.primitive.multiple_results else [results]
        return [_constant(np.asarray(r), shape) for r, shape in zip(results, shapes)]

    def elementwise(self, name: str, params: dict, ins: list[_Value], dtype: np.dtype, shape: tuple) -> tuple[str, bool]:
        """An elementwise op on the tensors as they are (ONNX broadcasts them): (output name, whether it is full)."""
        full = any(v.full and v.shape == shape for v in ins)
        zeros = [v.const is not None and not v.const.any() for v in ins]
        if name == "max" and any(zeros) and not all(zeros) and np.issubdtype(dtype, np.floating):
            # max(x, 0), ReLU: as Relu, which onnxruntime fuses into the convolution before it
            return self.node("Relu", [self.tensor(ins[zeros.index(False)])]), full
        if name == "sub" and ins[1].const is not None and np.issubdtype(ins[1].dtype, np.floating):
            # x - c as x + (-c), the same number: onnxruntime fuses Adds (BatchNorm's mean) into convolutions
            return self.node("Add", [self.tensor(ins[0]), self.initializer(-_without_leading_ones(ins[1].const))]), full
        x = [self.tensor(v) if v.const is None else self.initializer(_without_leading_ones(v.const)) for v in ins]
        if name in _ELEMENTWISE_BINARY:
            return self.node(_ELEMENTWISE_BINARY[name], x), full
        if name in _ELEMENTWISE_UNARY:
            return self.node(_ELEMENTWISE_UNARY[name], x), full
        if name == "ne":
            return self.node("Not", [self.node("Equal", x)]), full
        if name == "rsqrt":
            return self.node("Reciprocal", [self.node("Sqrt", x)]), full
        if name == "square":
            return self.node("Mul", [x[0], x[0]]), full
        if name == "integer_pow":
            y = params["y"]
            if y == 2:
                return self.node("Mul", [x[0], x[0]]), full
            return self.node("Pow", [x[0], self.initializer(np.asarray(y, dtype))]), full
        if name == "convert_element_type":
            return self.node("Cast", x, to=helper.np_dtype_to_tensor_dtype(dtype)), full
        if name == "clamp":  # clamp(min, x, max)
            return self.node("Max", [self.node("Min", [x[1], x[2]]), x[0]]), full
        # select_n(pred, case0, case1): case1 where pred
        if len(x) != 3:
            raise UnsupportedError(f"select_n with {len(x) - 1} cases has no ONNX translation (only 2)")
        pred = x[0] if ins[0].dtype == np.bool_ else self.node("Cast", [x[0]], to=TensorProto.BOOL)
        return self.node("Where", [pred, x[2], x[1]]), full

    # --- shapes and layout -------------------------------------------------------------------

    def _op_broadcast_in_dim(self, ins, shapes, dtypes, *, broadcast_dimensions, **_):
        (x,), (out_shape,) = ins, shapes
        missing = [d for d in range(len(out_shape)) if d not in broadcast_dimensions]
        if x.const is not None:
            return _constant(np.expand_dims(x.const, missing) if missing else x.const, out_shape)
        full = x.full and all(out_shape[d] == 1 for d in missing) and all(
            x.shape[i] == out_shape[d] for i, d in enumerate(broadcast_dimensions))
        name = self.node("Unsqueeze", [x.name, self.ints(missing)]) if missing else x.name
        return _Value(out_shape, x.dtype, name=name, full=full)

    def _op_reshape(self, ins, shapes, dtypes, *, dimensions=None, **_):
        if dimensions is not None:
            raise UnsupportedError("reshape with a dimension order has no ONNX translation")
        return self.node("Reshape", [self.full(ins[0]), self.shape_tensor(shapes[0], batch_as_minus_one=True)])

    def _op_squeeze(self, ins, shapes, dtypes, *, dimensions, **_):
        (x,) = ins
        return _Value(shapes[0], x.dtype, name=self.node("Squeeze", [self.tensor(x), self.ints(dimensions)]),
                      full=x.full)

    def _op_transpose(self, ins, shapes, dtypes, *, permutation, **_):
        (x,) = ins
        return _Value(shapes[0], x.dtype, name=self.node("Transpose", [self.tensor(x)], perm=list(permutation)),
                      full=x.full)

    def _op_concatenate(self, ins, shapes, dtypes, *, dimension, **_):
        return self.node("Concat", [self.full(v) for v in ins], axis=int(dimension))

    def _op_stack(self, ins, shapes, dtypes, *, axis, **_):
        """jnp.stack (rotary embeddings' channel pairs, EVA's q/k/v): each input given the new axis, then Concat."""
        axis = int(axis) % len(shapes[0])
        return self.node("Concat", [self.node("Unsqueeze", [self.full(v), self.ints([axis])]) for v in ins], axis=axis)

    def _op_slice(self, ins, shapes, dtypes, *, start_indices, limit_indices, strides, **_):
        (x,) = ins
        strides = strides or (1,) * len(start_indices)
        axes, starts, ends, steps = [], [], [], []
        for axis, (size, start, stride, out) in enumerate(zip(x.shape, start_indices, strides, shapes[0])):
            if not isinstance(size, int):
                if start != 0 or stride != 1 or out != size:
                    raise UnsupportedError("a slice of the batch dimension has no ONNX translation")
                continue
            if (start, stride, out) != (0, 1, size):
                axes.append(axis)
                starts.append(int(start))
                ends.append(int(limit_indices[axis]))
                steps.append(int(stride))
        if not axes:
            return self.tensor(x) if x.full else self.full(x)
        return self.node("Slice", [self.full(x), self.ints(starts), self.ints(ends), self.ints(axes), self.ints(steps)])

    def _op_pad(self, ins, shapes, dtypes, *, padding_config, **_):
        x, pad_value = ins
        if any(interior for _, _, interior in padding_config) or any(lo < 0 or hi < 0 for lo, hi, _ in padding_config):
            raise UnsupportedError("pad with interior or negative padding has no ONNX translation")
        pads = [lo for lo, _, _ in padding_config] + [hi for _, hi, _ in padding_config]
        value = self.initializer(np.asarray(np.broadcast_to(pad_value.const, ()), x.dtype)) if pad_value.const is not None \
            else self.tensor(pad_value)
        return self.node("Pad", [self.full(x), self.ints(pads), value], mode="constant")

    def _op_split(self, ins, shapes, dtypes, *, sizes, axis, **_):
        return self.node("Split", [self.full(ins[0]), self.ints(sizes)], num_outputs=len(sizes), axis=int(axis))

    # --- reductions --------------------------------------------------------------------------

    def _reduce(self, op: str, ins, axes):
        if not axes:  # ONNX reduces every axis when given none
            return self.full(ins[0])
        return self.node(op, [self.full(ins[0]), self.ints(axes)], keepdims=0)

    def _op_argmax(self, ins, shapes, dtypes, *, axes, index_dtype, **_):
        out = self.node("ArgMax", [self.full(ins[0])], axis=int(axes[0]), keepdims=0)
        return self.node("Cast", [out], to=helper.np_dtype_to_tensor_dtype(np.dtype(index_dtype)))

    # --- products, convolutions, pooling -----------------------------------------------------

    def _op_dot_general(self, ins, shapes, dtypes, *, dimension_numbers, preferred_element_type=None, **_):
        lhs, rhs = ins
        (lc, rc), (lb, rb) = dimension_numbers
        lfree = [d for d in range(len(lhs.shape)) if d not in lc and d not in lb]
        rfree = [d for d in range(len(rhs.shape)) if d not in rc and d not in rb]
        a, b = self.full(lhs), self.full(rhs)
        if len(lc) == 1 and len(rfree) == 1 and ((not lb and len(rhs.shape) == 2) or (lb and len(lfree) == 1)):
            # MatMul: lhs [batch..., free..., K] @ rhs [batch..., K, N] gives jax's [batch, lhs free, rhs free].
            a = self._permuted(a, [*lb, *lfree, *lc])
            b = self._permuted(b, [*rb, *rc, *rfree])
            out = self.node("MatMul", [a, b])
        else:
            letters = iter(string.ascii_letters)
            lhs_axes, rhs_axes = [next(letters) for _ in lhs.shape], [None] * len(rhs.shape)
            for i, j in zip([*lc, *lb], [*rc, *rb]):
                rhs_axes[j] = lhs_axes[i]
            rhs_axes = [axis or next(letters) for axis in rhs_axes]
            result = [lhs_axes[i] for i in lb] + [lhs_axes[i] for i in lfree] + [rhs_axes[j] for j in rfree]
            out = self.node("Einsum", [a, b], equation=f"{''.join(lhs_axes)},{''.join(rhs_axes)}->{''.join(result)}")
        if lhs.dtype != dtypes[0]:
            out = self.node("Cast", [out], to=helper.np_dtype_to_tensor_dtype(dtypes[0]))
        return out

    def _permuted(self, name: str, perm: Sequence[int]) -> str:
        perm = [int(p) for p in perm]
        return name if perm == list(range(len(perm))) else self.node("Transpose", [name], perm=perm)

    def _op_conv_general_dilated(self, ins, shapes, dtypes, *, window_strides, padding, lhs_dilation, rhs_dilation,
                              dimension_numbers, feature_group_count, batch_group_count, **_):
        lhs, rhs = ins
        if any(d != 1 for d in lhs_dilation or ()) or batch_group_count != 1:
            raise UnsupportedError("a transposed (lhs-dilated) or batch-grouped convolution has no ONNX translation")
        if isinstance(padding, str) or any(lo < 0 or hi < 0 for lo, hi in padding):
            raise UnsupportedError(f"convolution padding {padding!r} has no ONNX translation")
        lhs_spec, rhs_spec, out_spec = dimension_numbers
        x = self._permuted(self.full(lhs), list(lhs_spec))  # -> N, C, spatial...
        if rhs.const is not None:
            kernel = self.initializer(np.transpose(np.broadcast_to(rhs.const, rhs.shape), rhs_spec))  # -> O, I, spatial
        else:
            kernel = self._permuted(self.full(rhs), list(rhs_spec))
        y = self.node("Conv", [x, kernel], strides=list(window_strides), dilations=list(rhs_dilation or (1, 1)),
                      pads=[lo for lo, _ in padding] + [hi for _, hi in padding], group=int(feature_group_count))
        return self._permuted(y, list(np.argsort(out_spec)))

    def _op_reduce_window_max(self, ins, shapes, dtypes, *, window_dimensions, window_strides, padding,
                           base_dilation, window_dilation, **_):
        (x,) = ins
        spatial = [d for d in range(len(x.shape))
                   if window_dimensions[d] != 1 or window_strides[d] != 1 or tuple(padding[d]) != (0, 0)]
        other = [d for d in range(len(x.shape)) if d not in spatial]
        if len(other) != 2 or any(d != 1 for d in (*base_dilation, *window_dilation)):
            raise UnsupportedError(f"max pooling over axes {spatial} of a rank-{len(x.shape)} array, or dilated, has "
                                   "no ONNX translation (two pooled axes besides batch and channels)")
        perm = [*other, *spatial]
        y = self.node("MaxPool", [self._permuted(self.full(x), perm)],
                      kernel_shape=[window_dimensions[d] for d in spatial],
                      strides=[window_strides[d] for d in spatial],
                      pads=[padding[d][0] for d in spatial] + [padding[d][1] for d in spatial])
        return self._permuted(y, list(np.argsort(perm)))
