"""The HBP paper's experiments (exp01, exp02, exp08, exp09) on Fashion-MNIST or CIFAR-10.

``protocols`` holds the experiments, methods, hyper-parameters and profiles; ``runner`` trains and logs
resumable runs; ``results`` merges seeds and writes the table; ``plots`` the figures; ``timing`` measures
per-step costs; ``cli`` is the ``hbpc-experiments`` command.
"""
