from setuptools import find_packages, setup

setup(
    name="seal-fast",
    version="0.1.0",
    description="SEAL (Simulated annealing in EArly Layers, CVPR 2023) and its baselines on Tiny-ImageNet, fast",
    # kernels/ is installed as seal_fast.kernels (seal_fast/kernels links to it): the top-level name `kernels`
    # belongs to another package on PyPI, and installing both would break one of them
    packages=find_packages(include=["seal_fast", "seal_fast.*"]),
    python_requires=">=3.10",
    # lower bounds the code needs: torch.amp.GradScaler(device), torch.func, CUDA graphs with autocast
    # cache control (torch 2.4); Triton 3 (tl.dot input_precision); torchvision's ResNet of that torch
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "tqdm>=4.64",
        "matplotlib>=3.7",
        "pillow>=9.4",
        "scipy>=1.10",  # .mat files of Flowers102 / Stanford Dogs (transfer)
        "submitit>=1.5",  # sweep --launcher slurm
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=1.40"],   # --loader dali (GPU JPEG decoding); CUDA 13 build
        "tensorboard": ["tensorboard>=2.14"],    # --tensorboard
        # the tests run all three loaders (DALI's CPU operators included) to check they give the same batches
        "test": ["pytest>=7", "nvidia-dali-cuda130>=1.40"],
    },
    entry_points={"console_scripts": [
        "seal-train=seal_fast.train:main",
        "seal-depth=seal_fast.studies.depth:main",
        "seal-sweep=seal_fast.runs.sweep:main",
        "seal-report=seal_fast.runs.report:main",
        "seal-data=seal_fast.data.__main__:main",
        "seal-evaluate=seal_fast.evaluate:main",
        "seal-pof=seal_fast.studies.pof:main",
        "seal-hessian=seal_fast.studies.hessian:main",
        "seal-transfer=seal_fast.studies.transfer:main",
        "seal-fewshot=seal_fast.studies.fewshot:main",
    ]},
)
