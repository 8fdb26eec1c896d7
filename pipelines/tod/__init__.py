"""Task-oriented dialogue: a MultiWOZ-style environment in ConvLab-3's unified format, and a PPO dialogue policy.

Modules, from data to training (imports point this way only):
    config     the settings of both stages (tod_ppo, tod_continual)
    data       ontology, databases, goals and dialogues in the unified format (real files or ours), checked once
    synthetic  writes a small synthetic multi-domain corpus and its databases in that layout
    simulator  goal generator and the agenda-based user simulator (Schatzmann et al. 2007)
    dst        rule-based dialogue state tracking (DST)
    evaluator  success, inform precision/recall/F1, book rate, turns (ConvLab's MultiWozEvaluator, re-derived)
    env        the dialogue environment: system acts, state vector, reward
    policy     rule expert, random baseline, the MLP policy and its imitation pre-training
    ppo        PPO with GAE over dialogues, CleanRL-style
    stage      `run(config, tracker)`: imitation, then PPO, instrumented like every stage
    ddpt       a description-conditioned policy (DDPT-style): described acts attend over described state features
    continual  `run(config, tracker)` of `tod_continual`: PPO over a sequence of domains, naive or CLEAR replay
"""
