"""rl-baselines3-zoo's way into textgym: importing this module makes the zoo tune PPO with the text
sampler, and ``python -m agents.zoo`` replays a zoo-trained model.

The zoo has no hook for a custom sampler, and it runs nothing of ours but what it imports: the
class paths of a yaml file and the ``--gym-packages`` modules. So this module, and only this one,
calls :func:`agents.training.zoo.install_text_sampler` when imported, and textgym's yaml names its
callbacks through it (``agents.zoo.EpisodeRolloutBufferCallback``, ``agents.zoo.AdaptiveKLPenaltyCallback``):
``-optimize`` with that yaml gets the sampler, and ``--gym-packages textgym agents.zoo`` gets it
where the yaml's callbacks are imported too late (``--trial-id``). Everything else lives in
:mod:`agents.training.zoo`, which code that wants the zoo's pieces without touching its sampler
table imports instead.
"""

from agents.training.zoo import AdaptiveKLPenaltyCallback, EpisodeRolloutBufferCallback, install_text_sampler, main

__all__ = ["AdaptiveKLPenaltyCallback", "EpisodeRolloutBufferCallback", "main"]

install_text_sampler()  # why the zoo imports this module: see above

if __name__ == "__main__":
    main()
