"""The teaching code of ``docs/derivation.md``: backpropagation as explicit products of Jacobians.

    layouts   every factor of every chain as an explicit tensor, multiplied in numerator or
              denominator layout, in reverse mode (a cotangent from C) and forward mode (a
              tangent from the input or a weight), checked against torch.autograd / torch.func
    explain   ``python -m manualbp explain``: prints a network's chains with the shape of every
              factor and checks them numerically

Float64 and explicit matrices: meant to be read and checked, not fast. The runtime
(``manualbp.Linear``, the kernels) never imports this subpackage; it imports the runtime's
activations only.
"""
