"""What unipeft does with adapters once they exist: saving and loading
(:mod:`~unipeft.features.saving`), arithmetic (:mod:`~unipeft.features.arithmetic`), budget
planning (:mod:`~unipeft.features.budget`) and other libraries' formats
(:mod:`~unipeft.features.interop`). Each is built on :class:`unipeft.DeltaModel`'s public
methods only.
"""
