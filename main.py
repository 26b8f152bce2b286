"""cars_jax command line: train or evaluate the seed's recipe.

  python main.py --config=configs/demo.py                      # generated demo data, a few CPU minutes
  python main.py --config=configs/base.py --config.data_dir=/data/stanford_cars --workdir=runs/seed
  python main.py --config=configs/base.py --config.batch_size=64 ...   # any field overridden
  python main.py --mode=eval --workdir=runs/seed                # reports of the best checkpoint
  python main.py --mode=pretrain --config=configs/pretrain.py ... --workdir=runs/simclr
  python main.py --config=configs/fast30.py --config.pretrained_backbone=runs/simclr ...
  python main.py --mode=gradcam --workdir=runs/seed [--images=DIR] [--layer=stage3]
  python main.py --mode=predict --workdir=runs/seed --images=photo.jpg [--tta] [--top_k=5]
  python main.py --mode=export --workdir=runs/seed              # jax.export serving artifact
  srun python main.py --config=configs/base.py ...              # several hosts (SLURM): see README
  python main.py --mode=eval --init_from=best_high_acc_model.pt --config=configs/base.py \
      --config.data_dir=...                                     # the seed's PyTorch weights

User errors (bad flag values, missing data, incompatible workdirs) end with one line naming the
problem and the fix, exit code 2; --verbose shows the traceback.
"""
from __future__ import annotations

import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, 'configs', 'demo.py')
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (hyperparameters), default '
                                'configs/demo.py; override fields with --config.NAME=VALUE.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs, plots). '
                    'Default: runs/<config file name>.')
flags.DEFINE_enum('mode', 'train', ['train', 'pretrain', 'eval', 'gradcam', 'predict', 'export'],
                  'train: train or resume; pretrain: self-supervised (SimCLR) pretraining on the '
                  'train images, for --config.pretrained_backbone of a later run; '
                  'eval: reports of the best checkpoint of --workdir; '
                  'gradcam: Grad-CAM grid (--images or one validation image per class); '
                  'predict: top-k classes of --images; export: a jax.export serving artifact.')
flags.DEFINE_string('init_from', None, 'eval/gradcam/predict/export: use the seed notebook\'s '
                    'PyTorch checkpoint (best_high_acc_model.pt) instead of a workdir checkpoint; '
                    'class names come from --config.data_dir. Needs torch (CPU build).')
flags.DEFINE_string('export_dir', None, 'export: output folder (default <workdir>/export).')
flags.DEFINE_list('export_platforms', None, 'export: e.g. cpu,cuda (default: this backend).')
flags.DEFINE_string('images', None, 'An image file or a folder of images (gradcam, predict).')
flags.DEFINE_integer('top_k', 5, 'predict: classes listed per image (>= 1).', lower_bound=1)
flags.DEFINE_bool('tta', False, 'predict: average with the horizontally flipped image.')
flags.DEFINE_string('layer', None, 'gradcam: the stage whose activation is explained, '
                    'stage1..stageN (default: the deepest stage whose maps are at least 2x2: '
                    'the last, as the seed\'s model.l4, from 33 px with the seed\'s net).')
flags.DEFINE_string('compilation_cache', 'auto', "JAX's persistent compilation cache, so a "
                    'resumed or repeated run loads its compiled steps instead of compiling them '
                    'again: auto = $JAX_COMPILATION_CACHE_DIR if set, else '
                    '$XDG_CACHE_HOME/cars_jax/xla (~/.cache/cars_jax/xla); a folder; or off.')
flags.DEFINE_bool('xla_cpu_fusions', True, "XLA:CPU: keep single convolutions with XLA's own "
                  'kernels instead of YNNPACK (jaxlib >= 0.10; faster training, see '
                  'BENCHMARKS.md; your own XLA_FLAGS naming '
                  "--xla_cpu_experimental_ynn_fusion_type win). --noxla_cpu_fusions: jaxlib's "
                  'defaults.')
flags.DEFINE_bool('verbose', False, 'Show tracebacks of user errors.')
flags.DEFINE_string('coordinator_address', '', 'Multi-process training (several hosts): '
                    'host:port of process 0, as jax.distributed.initialize. Under SLURM or Open '
                    'MPI with several tasks leave it empty: JAX reads the cluster itself.')
flags.DEFINE_integer('num_processes', 0, 'Multi-process: the number of processes.')
flags.DEFINE_integer('process_id', -1, 'Multi-process: this process\'s index (0 writes logs).')


def _default_workdir() -> str:
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS['config'])))[0]
    return os.path.join('runs', name)


def run(argv) -> int:
    del argv
    # Orbax and grain log every save at INFO; keep the console for our own progress lines.
    logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
    if not FLAGS.verbose:  # library errors (e.g. a failed Orbax save) as one line each
        logging.get_absl_handler().addFilter(_drop_traceback)
    from cars_jax import distributed, runtime
    if FLAGS.xla_cpu_fusions:
        runtime.apply_cpu_xla_flags()
    multi_process = FLAGS.mode == 'train' and distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    cache_setting = runtime.cache_setting_for(FLAGS.compilation_cache, multi_process)
    if cache_setting != FLAGS.compilation_cache and _process_index() == 0:
        _console(runtime.MULTI_PROCESS_CPU_CACHE_NOTE, sys.stdout)
    runtime.enable_compilation_cache(cache_setting)
    from cars_jax import console, train
    if not FLAGS.verbose:  # a full disk: Orbax's first error line, then quiet (its threads' pages)
        logging.get_absl_handler().addFilter(console.MuteOnDiskFull(logging.get_absl_handler()))
    config = FLAGS.config
    workdir = FLAGS.workdir or _default_workdir()
    if FLAGS.mode == 'pretrain':
        from cars_jax import pretrain
        summary = pretrain.pretrain(config, workdir)
        if not summary.get('interrupted'):
            console.console(f'Done. Pretrained backbone in {workdir}/')
        return 0
    if FLAGS.mode == 'train':
        report = train.train_and_evaluate(config, workdir)
        if not report.get('interrupted') and _process_index() == 0:
            console.console(f'Done. Best checkpoint, report and curves in {workdir}/')
        return 0
    from cars_jax import evaluate
    src = {'init_from': FLAGS.init_from, 'config': config, 'log': console.console}
    if FLAGS.mode == 'eval':
        evaluate.run_eval(workdir, **src)
    elif FLAGS.mode == 'gradcam':
        evaluate.run_gradcam(workdir, FLAGS.images, layer=FLAGS.layer, **src)
    elif FLAGS.mode == 'predict':
        if not FLAGS.images:
            raise FileNotFoundError('--mode=predict needs --images=<image file or folder>.')
        evaluate.run_predict(workdir, FLAGS.images, top_k=FLAGS.top_k, tta_flip=FLAGS.tta, **src)
    elif FLAGS.mode == 'export':
        evaluate.run_export(workdir, FLAGS.export_dir or os.path.join(workdir, 'export'),
                            FLAGS.export_platforms, **src)
    else:
        raise AssertionError(FLAGS.mode)
    return 0


def _process_index() -> int:
    import jax
    return jax.process_index()


def _user_errors() -> tuple[type[BaseException], ...]:
    from cars_jax.config import ConfigError
    from cars_jax.data.sources import DataError
    from cars_jax.interop import InteropError
    from cars_jax.train import TrainingError
    return (ConfigError, DataError, TrainingError, InteropError, FileNotFoundError, PermissionError,
            NotADirectoryError, IsADirectoryError)


def main(argv) -> None:
    try:
        code = run(argv)
    except KeyboardInterrupt:
        _console('Interrupted.', sys.stderr)
        code = 130
    except Exception as e:  # noqa: BLE001 - the one place errors become messages
        user = isinstance(e, _user_errors()) or _disk_full(e)
        if (FLAGS.verbose or not user) and not _disk_full(e):
            traceback.print_exc()
        code = 2 if user else 1
        if _disk_full(e):
            # Orbax's failed save threads keep printing (pages while the managers close, and
            # at interpreter exit): stderr is muted for every thread (by the training loop as
            # soon as it saw the error, else here), our line goes to a private copy of it in
            # one call, and we leave without running exit handlers. The line starts with a
            # newline: a thread may have been cut off mid-line by the mute.
            from cars_jax.console import mute_stderr
            own = getattr(e, 'stderr_fd', None)
            own = mute_stderr() if own is None else own
            if FLAGS.verbose:
                os.write(own, traceback.format_exc().encode())
            os.write(own, f'\nerror: {_disk_full_message(e)}\n'.encode())
            os._exit(code)
        _console(f'error: {e}', sys.stderr)
    sys.exit(code)


def _console(msg: str, stream) -> None:
    from cars_jax.console import console   # survives a closed pipe (`... 2>&1 | head`)
    console(msg, stream)


def _drop_traceback(record) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


def _disk_full(e: BaseException) -> bool:
    from cars_jax.console import is_disk_full
    return is_disk_full(e)


def _disk_full_message(e: OSError) -> str:
    workdir = FLAGS.workdir or _default_workdir()
    return (f'the disk is full ({e.strerror}) writing {e.filename or workdir}. Free space there '
            f'(or use another --workdir) and run the same command again: the finished checkpoints '
            f'in {workdir}/checkpoints are intact (an unfinished save is a temporary folder, '
            f'removed on the next start).')


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with a bad --flag or an unknown --config.field as one line, exit 2."""
    for a in argv[1:]:
        if a.startswith('--config=') and not os.path.isfile(a.split('=', 1)[1]):
            print(f'error: config file {a.split("=", 1)[1]!r} not found; the configs are in '
                  f'{os.path.join(HERE, "configs")}/ (base.py, demo.py, ...).', file=sys.stderr)
            sys.exit(2)
    try:
        return FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flags/ml_collections raise several types
        if '--verbose' in argv:
            traceback.print_exc()
        msg = ' '.join(str(e).replace('\\n', ' ').replace("\\'", "'").split())
        if len(msg) > 1 and msg[0] == msg[-1] == "'":   # a KeyError's quoted field name
            msg = msg[1:-1]
        hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', msg)
        name = re.sub(r'[\'"]', '', msg)
        if hint:
            msg = f'unknown config field --config.{hint[2]}: did you mean --config.{hint[1]}?'
        elif any(a.split('=', 1)[0] == f'--config.{name}' for a in argv[1:]):
            msg = (f'unknown config field --config.{name}: the fields and their meaning are in '
                   f'{os.path.join(HERE, "configs", "base.py")}')
        print(f'error: {msg} (see python main.py --helpfull)', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    if not any(a == '--config' or a.startswith('--config=') for a in sys.argv[1:]):
        sys.argv.insert(1, f'--config={DEFAULT_CONFIG}')
    app.run(main, flags_parser=parse_flags)
