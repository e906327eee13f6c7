"""A stand-in for the few torchvision pieces diffusers' example scripts import, for bench/ races only.

torchvision's wheel does not import beside the CPU torch these machines install, and the peer scripts use only
`transforms.Compose/Resize/CenterCrop/ToTensor/Normalize/RandomHorizontalFlip/RandomCrop` on PIL images. This
package implements those with PIL and numpy, with torchvision's documented semantics (Resize of the shorter
side with PIL's antialiased resampling, CenterCrop's rounding, ToTensor's /255 CHW float). It is put on the
peer's PYTHONPATH by the bench harnesses, never installed, and never imported by zeroconv itself.
"""
