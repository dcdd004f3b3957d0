"""ckptd.training: the bundled GPT trainer (tensor, pipeline and ZeRO data parallelism).

Modules, one concern each: ``config`` (validated dataclasses), ``mesh`` (ParallelContext and
collectives), ``model`` (the GPT as one pipeline stage), ``tp``, ``pp``, ``zero``, ``data``
(layout-independent token stream), ``adapter`` (internal state <-> canonical tensors and
layouts), ``checkpoint`` (the trainer's state through ``ckptd.Checkpointer``: save, resume,
reshard on load) and ``trainer`` (the loop and its command line).
"""
