"""sb3-contrib's TRPO with its actor gradients taken in one backward pass instead of one per parameter.

``sb3_contrib.TRPO._compute_actor_grad`` differentiates the KL and the surrogate objective with
respect to each policy parameter in turn, with ``create_graph=True`` for the KL (Schulman et al.
2015 need its Hessian-vector products). That is one double-backward graph per parameter tensor:
harmless for an MLP of six tensors, but SmolLM2-135M has 272, and on the main job (2 envs x 8
steps, 16 transitions) the call took 79 s and grew the process to 22 GiB before the first
conjugate-gradient step. :class:`TransformerTRPO` computes the same gradients with one
``torch.autograd.grad`` call over all actor parameters (the gradients are equal; tested). Every
other part of the algorithm is sb3-contrib's.
"""

from __future__ import annotations

import torch as th
from sb3_contrib import TRPO


class TransformerTRPO(TRPO):
    """``sb3_contrib.TRPO`` whose actor gradients cost one backward pass (see the module doc).

    Same constructor, hyperparameters, logging, saving and loading as ``sb3_contrib.TRPO``;
    ``TransformerTRPO.load`` reads a zip that ``TRPO`` wrote and vice versa.
    """

    def _compute_actor_grad(self, kl_div: th.Tensor, policy_objective: th.Tensor
                            ) -> tuple[list[th.nn.Parameter], th.Tensor, th.Tensor, list[tuple[int, ...]]]:
        """As ``sb3_contrib.TRPO._compute_actor_grad``: the parameters the KL depends on (value
        parameters skipped by name, as upstream), and the flattened, concatenated gradients of the
        surrogate objective and of the KL (the latter with its graph, for Hessian-vector products).

        :param kl_div: scalar KL between the rollout's and the current policy.
        :param policy_objective: scalar surrogate objective.
        :return: ``(actor_params, policy_objective_gradients float32 (N,), grad_kl float32 (N,),
            grad_shape)`` with ``N`` the number of actor parameter entries.
        """
        params = [param for name, param in self.policy.named_parameters() if "value" not in name]
        kl_grads = th.autograd.grad(kl_div, params, create_graph=True, retain_graph=True, allow_unused=True)
        actor_params = [param for param, grad in zip(params, kl_grads) if grad is not None]
        grad_kl = [grad for grad in kl_grads if grad is not None]
        objective_grads = th.autograd.grad(policy_objective, actor_params, retain_graph=True)
        return (actor_params, th.cat([grad.reshape(-1) for grad in objective_grads]),
                th.cat([grad.reshape(-1) for grad in grad_kl]), [grad.shape for grad in grad_kl])


__all__ = ["TransformerTRPO"]
