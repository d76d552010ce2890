"""Default config: the paper's MNIST CapsNet and training recipe.

Override any field on the command line, e.g.
`python -m train.main --workdir=/tmp/caps --config.batch_size=32`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data.
  # 'mnist' or 'fashion_mnist'; 'multimnist' and 'affnist' have their own
  # configs (train/configs/multimnist.py, affnist.py).
  config.dataset = 'mnist'
  # Folder of the four original IDX files. '' means ../shared/data/<dataset>
  # beside the repository if present, else download (tfds, checksummed).
  config.data_dir = ''
  # Where tfds keeps the prepared array_record files.
  config.tfds_data_dir = '~/tensorflow_datasets'
  # Held out from the end of the train split to choose the checkpoint
  # tested. 0: train on every example and test the last checkpoint
  # (mnist and fashion_mnist only).
  config.validation_size = 5000
  # Random shift of training images, pixels (a float field, so that
  # --config.max_shift=2.8 parses; whole numbers unless subpixel_shifts).
  config.max_shift = 2.0
  # False: whole-pixel shifts (the paper's). True: real shifts uniform in
  # [-max_shift, max_shift], interpolated bilinearly (the Keras port:
  # max_shift=2.8, 10% of the width). mnist and fashion_mnist only.
  config.subpixel_shifts = False
  # Use only the first N training / evaluation examples (-1 = all); for
  # smoke tests and quick experiments.
  config.num_train_examples = -1
  config.num_eval_examples = -1

  # Model: 'capsnet' (capsjax.CapsNet, the fields below), or a baseline of
  # train/baselines.py: 'baseline_cnn', 'lenet5' (see their configs).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'capsnet'
  # How the class capsules are routed (capsjax.routing): 'dynamic' (the
  # paper's), 'em' (matrix-capsule EM routing on 4x4 poses, with the primary
  # capsules' lengths as activations), 'self_attention' (Efficient-CapsNet's,
  # non-iterative) or 'none' (uniform coupling, the ablation baseline).
  config.model.routing = 'dynamic'
  config.model.routing_iterations = 3
  config.model.stop_gradient_intermediate = False  # paper and official: False
  config.model.conv_features = 256
  config.model.primary_capsule_types = 32
  config.model.primary_capsule_dim = 8
  config.model.class_capsule_dim = 16
  config.model.decoder_hidden_sizes = (512, 1024)
  # How the convolutions are computed (capsjax/convolution.py; the
  # baselines' too): 'auto' (on the CPU the convolution theorem where it is
  # faster, else patches @ kernel; lax.conv elsewhere; see
  # capsjax.convolution.resolve_method), 'patches', 'fourier' or 'lax'. The
  # same maths either way.
  config.model.conv_method = 'auto'
  # Multiplies PrimaryCaps' convolution, not its bias. Official code: 1/32
  # (a side effect of its capsule layer); paper: 1.
  config.model.primary_capsule_scale = 1.0
  # True: the official code's initialisation (truncated normal kernels,
  # biases of 0.1) and its bias on the class capsules' s[j]
  # (capsjax.CapsNet.official_layers). Official: True, with
  # primary_capsule_scale=1/32 and reconstruction_weight=0.01.
  config.model.official_layers = False
  # Shortcut for model.routing_iterations (the field most often swept).
  config.routing_iterations = config.model.get_ref('routing_iterations')

  # Loss: margin loss + reconstruction_weight * sum of squared errors.
  # 0 trains without the decoder (the paper's "no reconstruction" rows).
  config.reconstruction_weight = 0.0005
  config.margin_positive = 0.9
  config.margin_negative = 0.1
  config.absent_class_weight = 0.5

  # Optimisation: Adam with exponential decay (official code: x0.96 every
  # 2000 steps, applied smoothly).
  config.learning_rate = 1e-3
  config.learning_rate_decay_rate = 0.96
  config.learning_rate_decay_steps = 2000
  # > 0: keep a moving average of the parameters with this decay per step
  # (train/averaging.py; 0.999 averages over about 1,000 steps) and
  # evaluate, choose, test and export it instead of the last parameters.
  # Not in the paper (0: off).
  config.parameter_average_decay = 0.0
  config.batch_size = 128  # global, over all devices and hosts
  # Evaluation's batch: at most the training batch, so that its temporaries
  # fit in the host memory the training step frees and keeps
  # (train/host_memory.py). At 500 the heap grew past the step's: 5 steps
  # and the two evaluations peaked at 3.4-5.1 GB resident against 2.4-3.6 GB
  # at 128, and took longer (docs/speed.md, "Host memory").
  config.eval_batch_size = 128
  # Evaluation batches per compiled call (`train.eval_steps`): what depends
  # only on the parameters is computed once per call. 8: CapsNet evaluation
  # at 1197 images/s against 1042 one batch a call, on a 2-core CPU
  # (docs/speed.md, "An epoch costs its steps").
  config.eval_batches_per_call = 8
  config.num_epochs = 50
  config.max_steps = -1  # stop after this many steps in all (-1: no limit)
  # Stop after the first epoch whose validation accuracy reaches this (0: no
  # target): the affNIST protocol trains each model until 99.2%.
  config.stop_at_validation_accuracy = 0.0
  # 'float32', or 'bfloat16': bfloat16 matmul inputs, float32 parameters,
  # optimizer state, squash, norms, routing and losses.
  config.precision = 'float32'
  config.seed = 0

  # Checkpoints (orbax) and logging.
  config.checkpoint_every_steps = 500  # and at the end of every epoch
  config.keep_checkpoints = 3  # the last K, plus the best on validation
  config.log_every_steps = 50
  config.num_reconstructions = 16  # test images in reconstructions.png

  # Several hosts: jax.distributed.initialize() when True, or when 'auto'
  # and a cluster environment (SLURM, Cloud TPU, ...) is detected. The
  # coordinator fields are only needed off a managed cluster.
  config.distributed = 'auto'
  config.coordinator_address = ''
  config.num_processes = -1
  config.process_id = -1
  return config
