import pytest
import torch

from diffspeed import DiffspeedError
from diffspeed.core import Edits


class Thing:
    existing = "class value"


def test_set_attr_restores_values_and_absence():
    t = Thing()
    t.own = 1
    e = Edits()
    e.set_attr(t, "own", 2)
    e.set_attr(t, "new", 3)
    e.set_attr(t, "existing", "instance value")
    assert (t.own, t.new, t.existing) == (2, 3, "instance value")
    e.undo()
    assert t.own == 1 and not hasattr(t, "new") and "existing" not in vars(t) and t.existing == "class value"


def test_submodule_replacement_is_undone():
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2))
    old = seq[0]
    e = Edits()
    e.set_attr(seq, "0", torch.nn.Identity())
    assert isinstance(seq[0], torch.nn.Identity)
    e.undo()
    assert seq[0] is old


def test_wrap_method_per_instance_and_out_of_order_removal_is_refused():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    first, second = Edits("first"), Edits("second")
    first.wrap_method(a, "forward", lambda inner, x: inner(x) * 0)
    second.wrap_method(a, "forward", lambda inner, x: inner(x) + 1)
    x = torch.ones(1, 2)
    assert torch.equal(a(x), torch.ones(1, 2)) and not torch.equal(b(x), torch.ones(1, 2))
    assert "forward" not in vars(b)  # the class was not touched
    with pytest.raises(DiffspeedError, match="reverse order"):
        first.undo()
    second.undo()
    first.undo()
    assert "forward" not in vars(a)


def test_retensor_restores_exact_values_after_lossy_cast():
    m = torch.nn.Linear(3, 3)
    w = m.weight.data.clone()
    e = Edits()
    e.retensor(m, lambda t: t.half())
    assert m.weight.dtype == torch.float16
    e.undo()
    assert m.weight.dtype == torch.float32 and torch.equal(m.weight.data, w)


def test_child_record_is_undone_early_and_again_by_its_parent():
    m = torch.nn.Linear(2, 2)
    parent = Edits("parent")
    child = parent.child("one call")
    child.forward_hook(m, lambda *_: None)
    child.forward_pre_hook(m, lambda *_: None)
    assert (len(m._forward_hooks), len(m._forward_pre_hooks)) == (1, 1)
    child.undo()  # the call ended
    assert (len(m._forward_hooks), len(m._forward_pre_hooks)) == (0, 0)
    child.forward_hook(m, lambda *_: None)  # the next call, which fails and never ends itself
    parent.undo()
    assert len(m._forward_hooks) == 0 and len(parent) == 0


def test_around_forgets_a_call_that_failed_between_pre_and_post():
    class Boom(Exception):
        pass

    inner = torch.nn.Linear(2, 2)
    edits = Edits("t")
    seen = []
    edits.around(inner, lambda x, kw: (x * 2, lambda out: seen.append("after") or out))
    fail = inner.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(Boom()))  # after pre, before post
    with pytest.raises(Boom):
        inner(torch.ones(1, 2))
    fail.remove()
    pending = edits._call_end[0].__self__  # around()'s list of outputs waiting for their post-hook
    assert len(pending) == 1
    edits.end_call()
    assert len(pending) == 0
    out = inner(torch.ones(1, 2))
    assert seen == ["after"] and out.shape == (1, 2)
    edits.undo()


def test_wrap_beneath_replaces_the_method_under_earlier_wrappers():
    class Box:
        def forward(self, x):
            return x + 1

    box, calls = Box(), []
    outer = Edits("outer")
    outer.wrap_method(box, "forward", lambda inner, x: (calls.append("outer"), inner(x) * 10)[1])
    wrapper = box.forward
    beneath = Edits("beneath")
    beneath.wrap_beneath(box, "forward", lambda fn: lambda x: (calls.append("compiled"), fn(x) + 100)[1])
    assert box.forward is wrapper, "the outer wrapper stays on top"
    assert box.forward(1) == (1 + 1 + 100) * 10 and calls == ["outer", "compiled"]
    assert beneath.counts["methods wrapped"] == 1
    beneath.undo()
    assert box.forward(1) == 20
    outer.undo()
    assert "forward" not in vars(box) and box.forward(1) == 2


def test_wrap_beneath_a_plain_method_sets_it_and_undoes():
    class Box:
        def forward(self, x):
            return x

    box = Box()
    edits = Edits("beneath")
    edits.wrap_beneath(box, "forward", lambda fn: lambda x: fn(x) * 2)
    assert box.forward(3) == 6 and edits.counts["methods wrapped"] == 1
    edits.undo()
    assert "forward" not in vars(box) and box.forward(3) == 3


def test_wrap_beneath_undone_after_its_wrapper_leaves_the_method_clean():
    class Box:
        def forward(self, x):
            return x

    box = Box()
    outer, beneath = Edits("outer"), Edits("beneath")
    outer.wrap_method(box, "forward", lambda inner, x: inner(x) + 1)
    beneath.wrap_beneath(box, "forward", lambda fn: lambda x: fn(x) * 2)
    outer.undo()  # the wrapper and what it held go together
    beneath.undo()
    assert "forward" not in vars(box) and box.forward(3) == 3
