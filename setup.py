from setuptools import find_packages, setup

setup(
    name="seal-fast",
    version="0.1.0",
    description="SEAL (Simulated annealing in EArly Layers, CVPR 2023) and its baselines on Tiny-ImageNet, fast",
    packages=find_packages(include=["seal_fast", "seal_fast.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "torchvision",
        "triton",
        "numpy",
        "nvidia-dali-cuda130",
        "tqdm",
        "matplotlib",
        "pillow",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["seal-train=seal_fast.train:main"]},
)
