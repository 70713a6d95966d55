"""The ``fastconv train`` application: training runs of the book's DeepConvNet on MNIST.

Needs the ``app`` extra (``pip install "fastconv[app]"``: matplotlib and
tqdm); the layers, kernels and the book-named modules do not.

- ``cli``: the ``fastconv`` command line (``train``, ``sweep``)
- ``exits``: the commands' exit codes, which error gets which, and the command that continues a run
- ``runs``: a run's output folder (settings, data source, results, figures)
- ``settings``: a run's settings, the recipes, its augmentation and validation split
- ``training``: the interruptible, resumable training loop
- ``checkpoint``: a run's whole state in one ``.npz`` file
- ``schedules``, ``augment``: learning-rate decay and data augmentation
- ``parallel``, ``executors``, ``progress``: models trained as tasks in worker processes or on Dask
- ``sweep``: grids of settings trained as independent runs, and their summary
- ``plots``: the PNG figures
"""
