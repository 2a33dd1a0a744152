"""CAMEL Lab engine: expert-group fine-tuning of transformer models.

Modules, in pipeline order:
    config    RunConfig: the one object a UI, a config file or the CLI hands to the engine
    data      read and validate task data, split it, build label maps
    models    load the embedded default, a local folder or a Hub model, with a task head
    groups    partition a model into expert groups (layer, module, ffn_clusters, rules)
    experts   FFN-neuron experts: clustering, sliced linears that train some rows / columns
    scoring   relevance of each group to the task, measured on the task's data
    select    task complexity and the selection rules
    methods   what each method trains (camel, baselines)
    tasks     tokenisation, predictions and metrics per task
    train     the training pipeline (transformers.Trainer), resumable runs
    evaluate  metrics and evaluating a finished run on another file
    delta     save / load only the trained tensors
    runs      the run store a UI polls
    cli       `python -m core ...`
The engine imports no UI library.
"""
