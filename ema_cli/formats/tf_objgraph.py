"""The TF2 object graph: what each tensor of an object-based checkpoint is.

``tf.train.Checkpoint`` stores every variable once, under the first path TF's
traversal of the object graph finds, and writes the graph itself into the
string tensor ``_CHECKPOINTABLE_OBJECT_GRAPH`` (a serialized
``TrackableObjectGraph``: node 0 is the root; each node has ``children``
(local name -> node id), ``attributes`` (``VARIABLE_VALUE`` -> checkpoint key)
and ``slot_variables``).  Keys are therefore no guide: a Keras 3 model saved
with its optimizer has its weights under ``optimizer/_trainable_variables/N``
(the optimizer is traversed first), a compiled model saved alone has Adam's
moments under ``model/optimizer/_variables/N``.  The roles are read from the
graph (:meth:`ObjectGraph.classify`), by this rule:

1. **Optimizer nodes.**  A node is an optimizer when it owns
   ``slot_variables`` (TF optimizers, tf.keras ``optimizers.legacy``), when an
   edge named ``optimizer`` leads to it (``tf.train.Checkpoint(optimizer=...)``,
   and every compiled Keras model's ``optimizer`` attribute), or when its
   children include an iteration counter (``_iterations``, ``iterations``,
   ``iter``) and a learning rate (``_learning_rate``, ``learning_rate``): the
   layout of Keras 3 and tf.keras optimizers, so an optimizer saved as
   ``opt=`` and a ``LossScaleOptimizer``'s ``inner_optimizer`` are found too.
   A root that is itself an optimizer (``Checkpoint(root=opt)``) leaves no
   model part.
2. **Model part.**  Every variable reachable from the root through children
   *without entering an optimizer node* is model state: a ``parameter``, or a
   ``buffer`` when the child edge that reaches it is named ``moving_mean`` /
   ``moving_variance`` (BatchNorm statistics: averaged, and post-hoc EMA takes
   them from the newest snapshot).  This is computed on the graph, not on the
   key: ``optimizer/_trainable_variables/0/...`` of a Keras 3 model is a
   parameter because node ``model/_operations/1/_kernel`` is that variable.
   Integer and other non-float variables there are ``counter`` when named
   ``step``, ``global_step``, ``epoch`` or ``save_counter`` (the root's
   ``save_counter`` is ``tf.train.Checkpoint``'s own), else ``other``.
3. **Optimizer part.**  Variables reached only through an optimizer node:
   the elements of an optimizer's ``_trainable_variables`` list (Keras 3: the
   model variables it updates, when the model itself is not in the
   checkpoint) and the originals of slot variables are ``parameter``; slot
   variables (``slot m of <original's path>``) and every other variable there
   (iterations, learning rate, ``_variables/N`` moments, loss scale) are
   ``optimizer`` state, copied from the newest checkpoint.
4. Attributes other than ``VARIABLE_VALUE`` (e.g. Keras config JSON strings)
   are ``other``; checkpoint keys the graph does not reference (shadows written
   by ``average --names shadow``) are left to the name rules.

The training step (:meth:`ObjectGraph.step_keys`): a ``global_step`` or
``step`` variable of the model part, else the iteration counter of the first
optimizer found (of its innermost ``inner_optimizer``: a Keras 3
``LossScaleOptimizer`` never increments its own).

:func:`rename_keys` rewrites the graph for ``rename``: each attribute's
``checkpoint_key`` follows its tensor's new name, so ``tf.train.Checkpoint.restore``
finds the renamed values.

The graph is decoded from (and, for ``rename``, re-encoded to) the protobuf wire
format by hand: no TensorFlow.  A rewrite changes only the ``checkpoint_key``
fields; every other field is written back as it was read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ema_cli.formats import tf_bundle as _wire

VARIABLE_VALUE = "VARIABLE_VALUE"

# child-edge names
_ITERATIONS = ("_iterations", "iterations", "iter")
_LEARNING_RATE = ("_learning_rate", "learning_rate")
_INNER = ("inner_optimizer", "_optimizer")
_TRAINABLE_LIST = "_trainable_variables"
_BUFFER_EDGES = frozenset({"moving_mean", "moving_variance"})
_COUNTER_EDGES = frozenset({"step", "global_step", "epoch", "save_counter"})

# structural categories (the reader turns them into Roles with the dtype)
MODEL = "model"
MODEL_BUFFER = "model buffer"
TRACKED = "tracked by the optimizer"  # a model variable known only through an optimizer's list
SLOT = "slot"
OPTIMIZER = "optimizer"
SAVE_COUNTER = "save counter"
ATTRIBUTE = "attribute"


class GraphError(ValueError):
    """The object graph does not parse or is inconsistent."""


@dataclass(frozen=True)
class Entry:
    """What the graph says of one checkpoint key."""

    category: str
    path: str  # the object path that reaches it (through the model part when it is model state)
    full_name: str = ""  # the variable's name when it was saved (``dense/kernel``)
    detail: str = ""  # slot name, attribute name

    def describe(self) -> str:
        name = f" ({self.full_name})" if self.full_name and self.full_name != self.path else ""
        if self.category == MODEL:
            return f"object graph: model variable {self.path}{name}"
        if self.category == MODEL_BUFFER:
            return f"object graph: model statistics {self.path}{name}"
        if self.category == TRACKED:
            return f"object graph: model variable tracked by the optimizer {self.path}{name}"
        if self.category == SLOT:
            return f"object graph: slot {self.detail} of {self.path}"
        if self.category == OPTIMIZER:
            return f"object graph: optimizer variable {self.path}{name}"
        if self.category == SAVE_COUNTER:
            return "object graph: tf.train.Checkpoint save counter"
        return f"object graph: attribute {self.detail} of {self.path or '(root)'}"


class _Ref:
    """``TrackableObject.ObjectReference``: a child edge."""

    __slots__ = ("node_id", "local_name")

    def __init__(self, buf):
        self.node_id, self.local_name = 0, ""
        for num, wt, v in _wire.fields(buf):
            if num == 1 and wt == 0:
                self.node_id = _wire.signed32(v)
            elif num == 2 and wt == 2:
                self.local_name = _text(v)


class _Attr:
    """``TrackableObject.SerializedTensor``: an attribute (``VARIABLE_VALUE`` -> checkpoint key).
    ``fields`` keeps every field as read, so a rewrite changes only the key."""

    __slots__ = ("name", "full_name", "checkpoint_key", "fields")

    def __init__(self, buf):
        self.name = self.full_name = self.checkpoint_key = ""
        self.fields = list(_wire.fields(buf))
        for num, wt, v in self.fields:
            if wt == 2 and num in (1, 2, 3):
                setattr(self, ("name", "full_name", "checkpoint_key")[num - 1], _text(v))

    def encode(self) -> bytes:
        out, done = bytearray(), False
        for num, wt, v in self.fields:
            if num == 3 and wt == 2:
                if done:
                    continue
                v, done = self.checkpoint_key.encode("utf-8", "surrogateescape"), True
            out += _encode_field(num, wt, v)
        if not done and self.checkpoint_key:
            out += _wire.len_field(3, self.checkpoint_key.encode("utf-8", "surrogateescape"))
        return bytes(out)


class _Slot:
    """``TrackableObject.SlotVariableReference``."""

    __slots__ = ("original_variable_node_id", "slot_name", "slot_variable_node_id")

    def __init__(self, buf):
        self.original_variable_node_id, self.slot_name, self.slot_variable_node_id = 0, "", 0
        for num, wt, v in _wire.fields(buf):
            if num == 1 and wt == 0:
                self.original_variable_node_id = _wire.signed32(v)
            elif num == 2 and wt == 2:
                self.slot_name = _text(v)
            elif num == 3 and wt == 0:
                self.slot_variable_node_id = _wire.signed32(v)


class _Node:
    """``TrackableObject``: children, attributes, slot variables (other fields kept as read)."""

    __slots__ = ("children", "attributes", "slot_variables", "fields")

    def __init__(self, buf):
        self.children, self.attributes, self.slot_variables = [], [], []
        self.fields = []
        for num, wt, v in _wire.fields(buf):
            if wt == 2 and num == 1:
                self.children.append(_Ref(v))
            elif wt == 2 and num == 2:
                a = _Attr(v)
                self.attributes.append(a)
                v = a
            elif wt == 2 and num == 3:
                self.slot_variables.append(_Slot(v))
            self.fields.append((num, wt, v))

    def encode(self) -> bytes:
        return b"".join(_wire.len_field(num, v.encode()) if isinstance(v, _Attr) else _encode_field(num, wt, v)
                        for num, wt, v in self.fields)


class _Graph:
    """``TrackableObjectGraph``: ``nodes`` (field 1); other fields kept as read."""

    def __init__(self, buf):
        self.nodes, self.fields = [], []
        for num, wt, v in _wire.fields(buf):
            if num == 1 and wt == 2:
                v = _Node(v)
                self.nodes.append(v)
            self.fields.append((num, wt, v))

    def SerializeToString(self) -> bytes:  # noqa: N802  (the protobuf name, for callers)
        return b"".join(_wire.len_field(num, v.encode()) if isinstance(v, _Node) else _encode_field(num, wt, v)
                        for num, wt, v in self.fields)


def _text(v: bytes) -> str:
    return bytes(v).decode("utf-8", "surrogateescape")


def _encode_field(num: int, wt: int, v) -> bytes:
    import struct

    if wt == 0:
        return _wire.varint_field(num, v)
    if wt == 1:
        return _wire.tag(num, 1) + struct.pack("<Q", v)
    if wt == 5:
        return _wire.tag(num, 5) + struct.pack("<I", v)
    return _wire.len_field(num, bytes(v))


def parse(raw: bytes) -> _Graph:
    """The ``TrackableObjectGraph`` (GraphError if it does not parse), decoded from
    the protobuf wire format without TensorFlow: its fields are numbered as in
    ``tensorflow/core/protobuf/trackable_object_graph.proto``."""
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    try:
        g = _Graph(bytes(raw))
    except (_wire.WireError, TypeError) as e:
        raise GraphError(f"not a TrackableObjectGraph ({e})") from None
    n = len(g.nodes)
    if n == 0:
        raise GraphError("it has no nodes")
    for i, node in enumerate(g.nodes):
        for c in node.children:
            if not 0 <= c.node_id < n:
                raise GraphError(f"node {i}'s child {c.local_name!r} is node {c.node_id} of {n}")
        for s in node.slot_variables:
            for ref in (s.original_variable_node_id, s.slot_variable_node_id):
                if not 0 <= ref < n:
                    raise GraphError(f"node {i}'s slot {s.slot_name!r} refers to node {ref} of {n}")
    return g


def _value_key(node) -> tuple[str, str] | None:
    for a in node.attributes:
        if a.name == VARIABLE_VALUE:
            return a.checkpoint_key, a.full_name
    return None


class ObjectGraph:
    """A parsed object graph and the classification above."""

    def __init__(self, raw: bytes):
        self.proto = parse(raw)
        self.nodes = list(self.proto.nodes)
        self.optimizers = self._optimizer_nodes()
        # first paths: the model part (never entering an optimizer node), then the rest
        if 0 in self.optimizers:  # an optimizer saved as the checkpoint's root
            self.model_paths = {}
            self.opt_paths, _ = self._bfs([0], blocked=set())
        else:
            self.model_paths, _ = self._bfs([0], blocked=self.optimizers)
            self.opt_paths, _ = self._bfs(self._optimizer_roots(), blocked=set(), seed=self.model_paths)
        # edge names leading to each node from the model part (BatchNorm statistics by any of them)
        self.model_edges: dict[int, set[str]] = {}
        for i in self.model_paths:
            for c in self.nodes[i].children:
                self.model_edges.setdefault(c.node_id, set()).add(c.local_name)

    # -- structure

    def _optimizer_nodes(self) -> set[int]:
        opt = set()
        for i, node in enumerate(self.nodes):
            names = {c.local_name for c in node.children}
            if node.slot_variables:
                opt.add(i)
            if names & set(_ITERATIONS) and names & set(_LEARNING_RATE):
                opt.add(i)
            for c in node.children:
                if c.local_name == "optimizer" and c.node_id != 0:
                    opt.add(c.node_id)
        # a wrapper's inner optimizer (whatever it looks like) is an optimizer too
        todo = list(opt)
        while todo:
            i = todo.pop()
            for c in self.nodes[i].children:
                if c.local_name in _INNER and c.node_id not in opt:
                    opt.add(c.node_id)
                    todo.append(c.node_id)
        return opt

    def _optimizer_roots(self) -> list[int]:
        """Optimizer nodes in the order a traversal from the root meets them."""
        seen, order, q = {0}, [], deque([0])
        while q:
            i = q.popleft()
            for c in self.nodes[i].children:
                if c.node_id in seen:
                    continue
                seen.add(c.node_id)
                if c.node_id in self.optimizers:
                    order.append(c.node_id)
                q.append(c.node_id)
        return order

    def _bfs(self, starts: list[int], blocked: set[int], seed: dict | None = None):
        """First path (tuple of child names) to every node reachable from ``starts``
        through children, not entering ``blocked`` (nor ``seed``'s nodes); and the
        name of the last edge."""
        paths: dict[int, tuple[str, ...]] = {}
        edge: dict[int, str] = {}
        q = deque()
        for s in starts:
            if seed is not None and s in seed:
                continue
            paths[s] = () if s == 0 else self._path_to(s)
            q.append(s)
        while q:
            i = q.popleft()
            for c in self.nodes[i].children:
                j = c.node_id
                if j in paths or j in blocked or (seed is not None and j in seed):
                    continue
                paths[j] = paths[i] + (c.local_name,)
                edge[j] = c.local_name
                q.append(j)
        return paths, edge

    def _path_to(self, target: int) -> tuple[str, ...]:
        """The first path from the root to ``target`` (any edges)."""
        paths = {0: ()}
        q = deque([0])
        while q:
            i = q.popleft()
            if i == target:
                return paths[i]
            for c in self.nodes[i].children:
                if c.node_id not in paths:
                    paths[c.node_id] = paths[i] + (c.local_name,)
                    q.append(c.node_id)
        return ("?",)

    @staticmethod
    def _join(path: tuple[str, ...]) -> str:
        return "/".join(path)

    # -- classification

    def classify(self) -> dict[str, Entry]:
        """``{checkpoint key: Entry}`` for every key the graph references."""
        out: dict[str, Entry] = {}
        tracked: set[int] = set()
        originals: dict[int, int] = {}  # slot node -> original node
        slot_names: dict[int, str] = {}
        for i in self.optimizers:
            node = self.nodes[i]
            for c in node.children:
                if c.local_name == _TRAINABLE_LIST:
                    tracked.update(cc.node_id for cc in self.nodes[c.node_id].children)
            for s in node.slot_variables:
                tracked.add(s.original_variable_node_id)
                originals[s.slot_variable_node_id] = s.original_variable_node_id
                slot_names[s.slot_variable_node_id] = s.slot_name

        # tf.train.Checkpoint's own counter: the root's child, even when the root is an optimizer
        save_counter = {c.node_id for c in self.nodes[0].children if c.local_name == "save_counter"}

        def path_of(i: int) -> str:
            if i in self.model_paths:
                return self._join(self.model_paths[i])
            if i in self.opt_paths:
                return self._join(self.opt_paths[i])
            return self._join(self._path_to(i))

        for i, node in enumerate(self.nodes):
            for a in node.attributes:
                if a.name != VARIABLE_VALUE:
                    out.setdefault(a.checkpoint_key, Entry(ATTRIBUTE, path_of(i), detail=a.name))
                    continue
                key, full = a.checkpoint_key, a.full_name
                if i in originals:
                    e = Entry(SLOT, path_of(originals[i]), full, slot_names[i])
                elif i in save_counter:
                    e = Entry(SAVE_COUNTER, "save_counter", full)
                elif i in self.model_paths:
                    p = self.model_paths[i]
                    if self.model_edges.get(i, set()) & _BUFFER_EDGES:
                        e = Entry(MODEL_BUFFER, self._join(p), full)
                    else:
                        e = Entry(MODEL, self._join(p), full)
                elif i in tracked:
                    e = Entry(TRACKED, path_of(i), full)
                else:
                    e = Entry(OPTIMIZER, path_of(i), full)
                out[key] = e
        return out

    def step_keys(self) -> list[str]:
        """Checkpoint keys of step counters, best first: a ``global_step``/``step``
        variable of the model part, then each optimizer's iteration counter
        (innermost ``inner_optimizer`` first)."""
        keys: list[str] = []
        for want in ("global_step", "step"):
            for i, p in self.model_paths.items():
                if p and p[-1] == want and len(p) == 1:
                    k = _value_key(self.nodes[i])
                    if k:
                        keys.append(k[0])
        roots = [0] if 0 in self.optimizers else self._optimizer_roots()
        for root in roots:
            chain = [root]
            while True:
                inner = [c.node_id for c in self.nodes[chain[-1]].children
                         if c.local_name in _INNER and c.node_id not in chain]
                if not inner:
                    break
                chain.append(inner[0])
            for i in reversed(chain):
                for c in self.nodes[i].children:
                    if c.local_name in _ITERATIONS:
                        k = _value_key(self.nodes[c.node_id])
                        if k and k[0] not in keys:
                            keys.append(k[0])
        return keys


def is_counter_edge(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in _COUNTER_EDGES


def rename_keys(raw: bytes, key_map: dict[str, str], out_keys) -> bytes:
    """The serialized graph with every attribute's ``checkpoint_key`` renamed by
    ``key_map`` ({old key: new key}); keys it does not list stay.  GraphError if
    a key the rewritten graph refers to is not among ``out_keys`` (the output's
    tensors), so ``tf.train.Checkpoint.restore`` of the output would miss it."""
    g = parse(raw)
    out_keys = set(out_keys)
    for node in g.nodes:
        for a in node.attributes:
            new = key_map.get(a.checkpoint_key, a.checkpoint_key)
            if new not in out_keys:
                raise GraphError(f"it refers to {a.checkpoint_key!r}, which the output does not hold")
            a.checkpoint_key = new
    return g.SerializeToString()
