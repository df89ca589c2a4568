"""detkit: Faster R-CNN training with first-class deformable convolution.

Importing detkit needs no GPU and no compiled extension; the ops in
`detkit.ops` say how to build the extension the first time they are used
without it.
"""

__version__ = "0.1.0"
