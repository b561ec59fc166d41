"""CIFAR-10-C / ImageNet-C corruption generators (work in progress; see the corruptions issue)."""
