"""The ``fastconv train`` application: training runs of the book's DeepConvNet on MNIST.

Needs the ``app`` extra (``pip install "fastconv[app]"``: matplotlib and
tqdm); the layers, kernels and the book-named modules do not.

- ``cli``: the ``fastconv`` command line
- ``runs``: a run's output folder (settings, data source, results, figures)
- ``training``: the interruptible, resumable training loop and its settings
- ``checkpoint``: a run's whole state in one ``.npz`` file
- ``schedules``, ``augment``: learning-rate decay and data augmentation
- ``plots``: the PNG figures
"""
