"""The per-task reference loop: MAML's and ANIL's meta-gradient computed one task at a time.

This is the computation that learn2learn's MAML.clone()/adapt() runs (and `higher`'s
innerloop_ctx), without their module machinery: plain F.conv2d / F.batch_norm / F.relu /
F.max_pool2d / F.linear on ONE task, an inner loop of torch.autograd.grad with
create_graph=not first_order, and each task's query loss divided by T and backpropagated
on its own. maml.py computes the same meta-gradient with every task of a chunk in one batched
computation; tests/test_reference.py checks that the two agree, and tests/benchmark.py times
them side by side.

The params are maml.py's dict layout WITHOUT the leading task dimension:
    conv{i}.w (C_out, C_in, 3, 3), bn{i}.w / bn{i}.b (C,), fc.w (D, N), fc.b (N,)   (conv net)
    fc{i}.w (in, out), fc{i}.b (out,)                                                 (MLP)
so a linear layer is F.linear(h, w.T, b). The losses are means over the examples, as in
maml.py: the inner loss is task i's mean, the meta-loss the mean over tasks of the query means.
"""

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# One task's network, written with torch's layers (what an nn.Module network runs)
# ---------------------------------------------------------------------------------------------

def conv_body(params, x, max_pool):
    """x (B, C, H, W) -> features (B, D). Omniglot (max_pool=False): stride-2 convs, then the
    global average. MiniImageNet (max_pool=True): stride 1 and 2x2 max-pool, flattened."""
    h = x
    for i in range(1, 5):
        h = F.conv2d(h, params[f"conv{i}.w"], stride=1 if max_pool else 2, padding=1)
        # batch statistics at training and test time, no running statistics (as maml.py)
        h = F.relu(F.batch_norm(h, None, None, params[f"bn{i}.w"], params[f"bn{i}.b"], training=True))
        if max_pool:
            h = F.max_pool2d(h, 2)
    return h.flatten(1) if max_pool else h.mean(dim=(2, 3))


def forward(params, x, max_pool):
    """The conv net: x (B, C, H, W) -> logits (B, N)."""
    return F.linear(conv_body(params, x, max_pool), params["fc.w"].T, params["fc.b"])


def mlp_layers(params):
    return len(params) // 2


def mlp_body(params, x):
    """Every layer of the MLP but the last: x (B, 1) -> features (B, 40)."""
    h = x
    for i in range(1, mlp_layers(params)):
        h = F.relu(F.linear(h, params[f"fc{i}.w"].T, params[f"fc{i}.b"]))
    return h


def mlp_forward(params, x):
    """The MLP: x (B, 1) -> (B, 1)."""
    last = mlp_layers(params)
    return F.linear(mlp_body(params, x), params[f"fc{last}.w"].T, params[f"fc{last}.b"])


def parts(params, kind, max_pool=False):
    """(body, head_keys, loss) of a model kind: "conv" (cross-entropy) or "mlp" (MSE)."""
    if kind == "conv":
        return (lambda p, x: conv_body(p, x, max_pool)), ("fc.w", "fc.b"), F.cross_entropy
    if kind == "mlp":
        last = mlp_layers(params)
        return mlp_body, (f"fc{last}.w", f"fc{last}.b"), F.mse_loss
    raise ValueError(f"unknown model kind {kind!r}; use 'conv' or 'mlp'")


def head(params, features, head_keys):
    w, b = head_keys
    return F.linear(features, params[w].T, params[b])


# ---------------------------------------------------------------------------------------------
# The algorithm, one task at a time
# ---------------------------------------------------------------------------------------------

def task_query_loss(params, x_s, y_s, x_q, y_q, kind, inner_steps, inner_lr, first_order,
                    anil=False, max_pool=False):
    """L_Ti(f_θ'_i) on task i's query set. MAML adapts every parameter; ANIL only the head, on
    the body's features, computed once (the body does not change in the inner loop)."""
    body, head_keys, loss_fn = parts(params, kind, max_pool)
    if anil:
        f_s, f_q = body(params, x_s), body(params, x_q)
        fast = {k: params[k] for k in head_keys}
        net = lambda p, f: head(p, f, head_keys)                     # noqa: E731
        x_s, x_q = f_s, f_q
    else:
        fast = dict(params)
        net = lambda p, x: head(p, body(p, x), head_keys)            # noqa: E731
    for _ in range(inner_steps):
        grads = torch.autograd.grad(loss_fn(net(fast, x_s), y_s), list(fast.values()),
                                    create_graph=not first_order)
        fast = {k: w - inner_lr * g for (k, w), g in zip(fast.items(), grads)}
    return loss_fn(net(fast, x_q), y_q)


def accumulate_meta_gradient(params, batch, kind, inner_steps, inner_lr, first_order,
                             anil=False, max_pool=False):
    """Adds ∇θ (1/T) Σ_i L_Ti(f_θ'_i) into each param's .grad, one task's graph at a time.
    batch: x_s (T, ...), y_s, x_q, y_q as maml.py's. Returns the meta-loss."""
    x_s, y_s, x_q, y_q = batch
    tasks = x_s.shape[0]
    total = 0.0
    for t in range(tasks):
        loss = task_query_loss(params, x_s[t], y_s[t], x_q[t], y_q[t], kind, inner_steps,
                               inner_lr, first_order, anil, max_pool) / tasks
        loss.backward()
        total += loss.item()
    return total


def meta_gradient(params, batch, kind, inner_steps, inner_lr, first_order, anil=False, max_pool=False):
    """The meta-gradient as a dict {name: grad}, on fresh leaf copies of params."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    accumulate_meta_gradient(leaves, batch, kind, inner_steps, inner_lr, first_order, anil, max_pool)
    return {k: v.grad for k, v in leaves.items()}


def meta_step(params, optimizer, batch, kind, inner_steps, inner_lr, first_order, anil=False, max_pool=False):
    """θ ← θ − β ∇θ (1/T) Σ_i L_Ti(f_θ'_i), with the optimizer (Adam in the benchmark)."""
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_meta_gradient(params, batch, kind, inner_steps, inner_lr, first_order, anil, max_pool)
    optimizer.step()
    return loss
